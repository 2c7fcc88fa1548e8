"""
The protocol over loopback TCP with the master and a worker running in the
test's own reactor (the worker still runs jobs in real ampoule processes).
Blocking client calls run in a thread.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from cw.client import ClusterExecutor, MasterUnavailable, master_status
from cw.master.service import MasterService
from cw.test.peers import GatedAMP
from cw.test.procs import DEADLINE, executor, until, wait_until
from cw.wire import commands as P
from cw.wire.auth import authenticate
from cw.wire.secret import load_secret
from cw.worker.service import WorkerService


def triple(x):
    return 3 * x


class LoopbackTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.master = MasterService("tcp:0:interface=127.0.0.1", reactor=reactor, secret=load_secret())
        d = defer.maybeDeferred(self.master.startService)
        self.addCleanup(self.master.stopService)
        return d

    @property
    def address(self):
        return "127.0.0.1:%d" % self.master.port.getHost().port

    def messages(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]

    def start_worker(self, procs=1):
        worker = WorkerService(self.address, procs=procs, secret=load_secret(), reactor=reactor)
        worker.startService()
        self.addCleanup(lambda: worker.running and worker.stopService())
        return self.master.master.await_workers(len(self.master.master.workers) + 1).addCallback(
            lambda _: worker
        )

    @defer.inlineCallbacks
    def test_jobs_and_logged_arrival_departure(self):
        """
        Jobs run through an in-process master and worker; the master logs
        the worker's arrival and departure.
        """
        worker = yield self.start_worker(procs=2)

        def body():
            with executor(self.address) as ex:
                return list(ex.map(triple, range(100), timeout=DEADLINE))

        results = yield threads.deferToThread(body)
        self.assertEqual(results, [3 * x for x in range(100)])
        self.assertTrue(any("Worker 1 joined" in m and "2 slots" in m for m in self.messages()))
        yield worker.stopService()
        yield until(lambda: not self.master.master.workers, what="the master to see the worker leave")
        self.assertTrue(any("Worker 1" in m and "left" in m for m in self.messages()))

    @defer.inlineCallbacks
    def test_disconnected_client_jobs_dropped(self):
        """
        A client that shuts down without waiting and cancels its futures
        (no workers) disconnects at once, and the master drops its queued
        jobs; a worker that joins later runs none of them.
        """

        def body():
            ex = ClusterExecutor(self.address)
            try:
                for i in range(50):
                    ex.submit(triple, i)
                return wait_until(
                    lambda: (s := master_status(self.address))["queued"] >= 50 and s,
                    timeout=10,
                    what="50 jobs queued",
                )
            finally:
                ex.shutdown(wait=False, cancel_futures=True)

        status = yield threads.deferToThread(body)
        self.assertEqual(status["queued"], 50)
        yield until(lambda: not self.master.master.clients, what="the master to see the client leave")
        self.assertEqual(self.master.master.scheduler.queued, 0)
        self.assertTrue(any("dropped 50 queued jobs" in m for m in self.messages()))

    @defer.inlineCallbacks
    def submit_raw(self, authenticated: bool):
        """Send a well-formed SubmitJobs box without registering; wait for the hang-up."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.master.port.getHost().port)
        proto = yield connectProtocol(endpoint, GatedAMP())
        if authenticated:
            yield authenticate(proto, load_secret(), "client", "test")
        lost = defer.Deferred()
        proto.connectionLost = lambda reason: lost.callback(None)
        proto.callRemote(P.SubmitJobs, jobs=[P.Job(0, 1, b"junk")])
        yield lost.addTimeout(10, reactor)
        self.assertEqual(self.master.master.scheduler.queued, 0)

    @defer.inlineCallbacks
    def test_unauthenticated_commands_closed(self):
        """A peer that submits before authenticating is disconnected; nothing is queued."""
        yield self.submit_raw(authenticated=False)
        self.assertTrue(any("'SubmitJobs' before authenticating" in m for m in self.messages()))

    @defer.inlineCallbacks
    def test_unregistered_commands_closed(self):
        """An authenticated peer that submits before registering is disconnected."""
        yield self.submit_raw(authenticated=True)
        self.assertTrue(any("before registering" in m for m in self.messages()))

    @defer.inlineCallbacks
    def test_version_mismatch(self):
        """A peer of another protocol version is refused with a clear error."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.master.port.getHost().port)
        proto = yield connectProtocol(endpoint, GatedAMP())
        self.addCleanup(proto.transport.loseConnection)
        yield authenticate(proto, load_secret(), "client", "test")
        error = yield self.assertFailure(
            proto.callRemote(
                P.RegisterClient,
                version=P.PROTOCOL_VERSION + 1,
                host="h",
                pid=1,
                context={"cwd": "/", "path": []},
                session="s",
            ),
            P.VersionMismatch,
        )
        self.assertIn("install the same cw version", str(error))

    @defer.inlineCallbacks
    def test_client_connection_keepalive(self):
        """
        Both ends of a client connection keep TCP alive (clients get no
        heartbeats) with the README's timers: probes after 10 s idle, every
        5 s, three tries (about 25 s in all; the end-to-end check of that
        bound is test_faults_e2e's QuietLinkTests).
        """
        ex = yield threads.deferToThread(ClusterExecutor, self.address)
        self.addCleanup(threads.deferToThread, ex.shutdown)
        (server,) = self.master.master.clients.values()
        for transport in (ex.session.proto.transport, server.transport):
            self.assertEqual(keepalive_timers(transport.getHandle()), (1, 10, 5, 3))

    @defer.inlineCallbacks
    def test_master_gone_fails_futures(self):
        """When the master goes away, pending futures fail with MasterUnavailable."""

        def submit():
            ex = ClusterExecutor(self.address, reconnect_timeout=0)
            return ex, ex.submit(triple, 1)

        ex, future = yield threads.deferToThread(submit)
        yield until(lambda: self.master.master.scheduler.queued, what="the job to be queued")
        yield self.master.stopService()
        error = yield threads.deferToThread(future.exception, 10)
        self.assertIsInstance(error, MasterUnavailable)
        self.assertIn("shut down (the master was stopped)", str(error))
        yield threads.deferToThread(ex.shutdown)


def keepalive_timers(sock) -> tuple[int, int, int, int]:
    """A socket's (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT)."""
    import socket

    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


class KeepaliveTests(unittest.TestCase):
    """Connections without heartbeats use TCP keepalive with short timers."""

    @defer.inlineCallbacks
    def test_keepalive_on_both_ends(self):
        """
        C{enable_keepalive} sets the README's timers on a connecting and an
        accepting socket: 10 s idle, probes every 5 s, three of them.
        """
        from twisted.internet.protocol import Factory, Protocol

        from cw.wire.address import enable_keepalive

        server_side = []

        class Remember(Protocol):
            def connectionMade(self):
                enabled = enable_keepalive(self.transport)
                server_side.append((enabled, keepalive_timers(self.transport.getHandle())))

        port = reactor.listenTCP(0, Factory.forProtocol(Remember), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proto = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        self.addCleanup(proto.transport.loseConnection)
        self.assertTrue(enable_keepalive(proto.transport))
        self.assertEqual(keepalive_timers(proto.transport.getHandle()), (1, 10, 5, 3))
        yield until(lambda: server_side, what="the server side to connect")
        self.assertEqual(server_side, [(True, (1, 10, 5, 3))])
