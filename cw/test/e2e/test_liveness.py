"""
Liveness (issue 11, items 5 and 6): the master enforces jobs' deadlines
itself, and clients and master notice each other's silence.

Unit tests use a fake clock (L{cw.wire.liveness.HeartbeatMonitor}, the master's
reactions); the end-to-end tests run a real C{twistd cw-master}, real
workers, and peers in this process that speak the real protocol but
misbehave: a worker that answers heartbeats and never returns a result, a
client that stops answering.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from concurrent import futures

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from cw.client import ClientThread, ClusterExecutor
from cw.client.session import master_timeout_setting
from cw.errors import JobTimeout, MasterUnavailable
from cw.master.service import Master
from cw.test.jobs import square, worker_pid
from cw.test.master.test_master_faults import FakePeer
from cw.test.procs import Processes, arguments_travel, executor, wait_until
from cw.wire import commands as P
from cw.wire.address import client_endpoint
from cw.wire.auth import AuthGate, authenticate
from cw.wire.liveness import PINGS_PER_TURN, HeartbeatMonitor, SignsOfLife
from cw.wire.secret import load_secret
from cw.worker.service import join_master

# -- unit tests (fake clock) ---------------------------------------------


class _Sink:
    def dataReceived(self, data):
        pass


class Peer(SignsOfLife, _Sink):
    """A watched connection: records heartbeats, receives data on demand."""

    def __init__(self) -> None:
        self.pings: list[defer.Deferred] = []

    def callRemote(self, command, **kwargs):
        assert command is P.Heartbeat
        d = defer.Deferred()
        self.pings.append(d)
        return d

    def answer(self, failure: bool = False) -> None:
        for d in self.pings:
            if not d.called:
                if failure:
                    d.errback(RuntimeError("UNHANDLED"))
                else:
                    d.callback({})


class HeartbeatMonitorTests(SynchronousTestCase):
    """The one heartbeat mechanism that master and clients share."""

    def setUp(self):
        self.clock = Clock()
        self.silent: list[tuple[Peer, float]] = []
        self.monitor = HeartbeatMonitor(self.clock, 1.0, 3.0, lambda p, s: self.silent.append((p, s)))
        self.monitor.start()
        self.addCleanup(self.monitor.stop)
        self.peer = Peer()
        self.monitor.watch(self.peer)

    def test_invalid(self):
        self.assertRaises(ValueError, HeartbeatMonitor, self.clock, 0, 3, None)
        self.assertRaises(ValueError, HeartbeatMonitor, self.clock, 1, 0, None)

    def test_answering_peer_kept(self):
        for _ in range(20):
            self.clock.advance(1.0)
            self.peer.answer()
        self.assertEqual(self.silent, [])
        self.assertEqual(len(self.peer.pings), 20)

    def test_silence_reported_within_timeout_plus_interval(self):
        self.clock.advance(3.0)
        self.assertEqual(self.silent, [])
        self.assertEqual(len(self.peer.pings), 1, "no second ping while one is unanswered")
        self.clock.advance(1.0)
        [(peer, silent)] = self.silent
        self.assertIs(peer, self.peer)
        self.assertEqual(silent, 4.0)

    def test_any_data_is_a_sign_of_life(self):
        """A peer busy sending a big box, its answer queued behind it, is not silent."""
        for _ in range(20):
            self.clock.advance(1.0)
            self.peer.dataReceived(b"x")
        self.assertEqual(self.silent, [])

    def test_error_answer_is_a_sign_of_life(self):
        for _ in range(20):
            self.clock.advance(1.0)
            self.peer.answer(failure=True)
        self.assertEqual(self.silent, [])

    def test_forgotten_peer_not_pinged(self):
        self.monitor.forget(self.peer)
        self.clock.advance(10)
        self.assertEqual((self.peer.pings, self.silent), ([], []))

    def test_many_peers_pinged_a_few_hundred_per_turn(self):
        """
        A tick with more peers to ping than L{PINGS_PER_TURN} pings that
        many, the rest on the next turns of the reactor: answers that come
        in the next turn are in before the next pings leave, so no more
        than L{PINGS_PER_TURN} are unanswered at once (not 1,000).  Each
        peer is pinged once per tick; one forgotten meanwhile is not.
        """
        clock, monitor, outstanding = self.clock, self.monitor, [0, 0]

        class Answering(Peer):
            def callRemote(self, command, **kwargs):
                if self is peers[0]:
                    monitor.forget(peers[-1])  # its connection lost after the tick, before its ping
                d = super().callRemote(command, **kwargs)
                outstanding[0] += 1
                outstanding[1] = max(outstanding)

                def answered():
                    outstanding[0] -= 1
                    d.callback({})

                clock.callLater(0, answered)  # the answer comes in the next turn
                return d

        self.monitor.forget(self.peer)
        peers = [Answering() for _ in range(1_000)]
        for peer in peers:
            self.monitor.watch(peer)
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual([len(peer.pings) for peer in peers], [3] * 999 + [0])
        self.assertEqual(outstanding, [0, PINGS_PER_TURN])
        self.assertEqual(self.silent, [])

    def test_stop_drops_the_rest_of_a_tick(self):
        """The monitor stopped while it sends a tick's heartbeats: the rest of them are not sent."""
        monitor = self.monitor

        class Stopping(Peer):
            def callRemote(self, command, **kwargs):
                monitor.stop()
                return super().callRemote(command, **kwargs)

        self.monitor.forget(self.peer)
        peers = [Stopping()] + [Peer() for _ in range(PINGS_PER_TURN)]
        for peer in peers:
            self.monitor.watch(peer)
        self.clock.advance(1.0)
        self.assertEqual(sum(len(peer.pings) for peer in peers), PINGS_PER_TURN)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MasterTimeoutSettingTests(SynchronousTestCase):
    def test_default_env_and_keyword(self):
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CW_MASTER_TIMEOUT"})
        self.assertEqual(master_timeout_setting(None), 20.0)
        self.assertLess(master_timeout_setting(None) * 1.25, 30)
        os.environ["CW_MASTER_TIMEOUT"] = "7.5"
        self.assertEqual(master_timeout_setting(None), 7.5)
        self.assertEqual(master_timeout_setting(3), 3.0)
        self.assertEqual(master_timeout_setting(0), 0.0)

    def test_invalid(self):
        self.patch(os, "environ", {**os.environ, "CW_MASTER_TIMEOUT": "soon"})
        self.assertIn("CW_MASTER_TIMEOUT", str(self.assertRaises(ValueError, master_timeout_setting, None)))
        for bad in (-1, float("inf"), "3", True):
            self.assertRaises(ValueError, master_timeout_setting, bad)


class ClientPeer(FakePeer):
    """A client connection as the master sees it; dropping it is recorded."""

    def __init__(self, master, name):
        super().__init__(master, name)
        self.transport = self
        self.aborted = False

    def abortConnection(self):
        self.aborted = True
        self.master.client_left(self)


class MasterReactionTests(SynchronousTestCase):
    """What the master does with the scheduler's deadline decisions and silent clients."""

    def setUp(self):
        self.clock = Clock()
        self.master = Master(clock=self.clock, heartbeat=1.0, client_timeout=4.0, deadline_grace=2.0)
        self.master.start_heartbeats()
        self.master.start_deadlines()
        self.addCleanup(self.master.stop_heartbeats)
        self.addCleanup(self.master.stop_deadlines)
        self.client = ClientPeer(self.master, "c:1")
        self.client.peer_id = self.master.client_joined(self.client, {"cwd": "", "path": []})

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let time pass, every peer answering its heartbeats."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            for peer in [self.client, *self.master.workers.values()]:
                for d in peer.pings():
                    if not d.called:
                        d.callback({})

    def test_silent_worker_dropped_and_job_runs_elsewhere(self):
        wedged = FakePeer(self.master, "wedged:1")
        wedged.peer_id = self.master.worker_joined(wedged, 1)
        self.master.submit(self.client.peer_id, [P.Job(0, 1, b"p", P.encode_options(timeout=3))])
        self.advance(4.5)
        self.assertFalse(wedged.transport.aborted)
        self.advance(0.5)
        self.assertTrue(wedged.transport.aborted)
        self.assertIn("returned no result", wedged.lost_how)
        other = FakePeer(self.master, "other:2")
        other.peer_id = self.master.worker_joined(other, 1)
        self.clock.advance(0)
        [(_, kwargs, _)] = [c for c in other.calls if c[0] is P.RunJobs]
        self.assertEqual([job.seq for job in kwargs["jobs"]], [1])

    def test_busy_worker_told_to_cancel_overdue_job(self):
        worker = FakePeer(self.master, "busy:1")
        worker.peer_id = self.master.worker_joined(worker, 2)
        self.master.submit(
            self.client.peer_id, [P.Job(0, 1, b"p", P.encode_options(timeout=3)), P.Job(0, 2, b"q")]
        )
        self.clock.advance(0)
        self.advance(1.0)
        self.master.results(worker.peer_id, [P.Result(self.client.peer_id, 2, P.Outcome.OK, b"r")])
        self.advance(4.0)
        self.assertFalse(worker.transport.aborted)
        cancels = [kwargs["keys"] for command, kwargs, _ in worker.calls if command is P.CancelJobs]
        self.assertEqual(cancels, [[(self.client.peer_id, 1)]])

    def test_job_timeout_delivered_after_max_attempts(self):
        master = Master(clock=self.clock, heartbeat=0, deadline_grace=2.0, max_attempts=1)
        master.start_deadlines()
        self.addCleanup(master.stop_deadlines)
        client = ClientPeer(master, "c:2")
        client.peer_id = master.client_joined(client, {"cwd": "", "path": []})
        worker = FakePeer(master, "wedged:1")
        worker.peer_id = master.worker_joined(worker, 1)
        master.submit(client.peer_id, [P.Job(0, 1, b"p", P.encode_options(timeout=3))])
        self.clock.advance(5.5)
        [result] = client.results
        self.assertEqual(P.read_error_report(result.payload)["type"], "JobTimeout")

    def test_silent_client_dropped(self):
        self.clock.advance(4.0)
        self.assertFalse(self.client.aborted)
        self.clock.advance(1.0)
        self.assertTrue(self.client.aborted)
        self.assertEqual(self.master.clients, {})

    def test_answering_client_kept(self):
        self.advance(60)
        self.assertFalse(self.client.aborted)

    def test_client_not_read_from_is_not_silent(self):
        """A client the master stopped reading (flow control) cannot be heard: not its fault."""
        self.master.flow.stop_reading(self.client.peer_id)
        self.clock.advance(60)
        self.assertFalse(self.client.aborted)


# -- end to end ------------------------------------------------------------


class SilentWorker(AuthGate, amp.AMP):
    """
    A worker that authenticates, registers, answers heartbeats and takes
    jobs, but never returns a result (a wedged worker).
    """

    def __init__(self, secret: bytes, address: str) -> None:
        super().__init__()
        self.secret, self.address = secret, address
        self.jobs: list[P.Job] = []
        self.pings = 0
        self.registered: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.lost_at: float | None = None
        self.got_jobs_at: float | None = None

    def connectionMade(self):
        super().connectionMade()
        join_master(self, self.secret, self.address, 1).chainDeferred(self.registered)

    @P.RunJobs.responder
    def run_jobs(self, jobs):
        if self.got_jobs_at is None:
            self.got_jobs_at = time.monotonic()
        self.jobs.extend(jobs)
        return {}

    @P.Heartbeat.responder
    def heartbeat(self):
        self.pings += 1
        return {}

    @P.ClientContext.responder
    def client_context(self, client, context):
        return {}

    @P.DefineFunction.responder
    def define_function(self, client, key, function):
        return {}

    @P.ForgetClient.responder
    def forget_client(self, client):
        return {}

    @P.CancelJobs.responder
    def cancel_jobs(self, keys):
        return {}

    @P.MasterStopping.responder
    def master_stopping(self, reason):
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost_at = time.monotonic()
        self.lost.callback(None)


class MuteClient(AuthGate, amp.AMP):
    """A client that authenticates, registers, submits a job, then never answers anything."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: defer.Deferred = defer.Deferred()
        self.lost_at: float | None = None

    def locateResponder(self, name):
        if name == P.Heartbeat.commandName:
            return lambda box: defer.Deferred()  # never answered
        if self.authenticated:
            return lambda box: defer.succeed(amp.AmpBox())  # anything else: ignored
        return super().locateResponder(name)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost_at = time.monotonic()
        self.lost.callback(None)


@defer.inlineCallbacks
def connect(address: str, build):
    proto = yield client_endpoint(reactor, address).connect(Factory.forProtocol(build))
    return proto


@defer.inlineCallbacks
def silent_worker(address: str):
    """Connect a L{SilentWorker} to the master at C{address}; fires once registered."""
    secret = load_secret()
    proto = yield connect(address, lambda: SilentWorker(secret, address))
    yield proto.registered
    return proto


@defer.inlineCallbacks
def mute_client(address: str):
    """Connect a L{MuteClient} that has one job queued; fires with it and its client id."""
    proto = yield connect(address, MuteClient)
    yield authenticate(proto, load_secret(), "client", address)
    answer = yield proto.callRemote(
        P.RegisterClient,
        version=P.PROTOCOL_VERSION,
        host=socket.gethostname(),
        pid=os.getpid(),
        context={"cwd": os.getcwd(), "path": []},
        session="mute",
    )
    proto.callRemote(P.SubmitJobs, jobs=[P.Job(0, 1, b"never run")])
    proto.sent_last = time.monotonic()
    return proto, answer["client_id"]


def in_reactor(f, *args):
    """Call C{f} in the reactor from a test thread; wait for its result."""
    return threads.blockingCallFromThread(reactor, f, *args)


#: Allowance, on a loaded 2-core machine, for scheduling and process start
#: on top of a promised bound.
SLACK = 2.0


class DeadlineEndToEndTests(unittest.TestCase):
    """A worker that answers heartbeats but never returns results does not hold jobs for ever."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_jobs_of_wedged_worker_run_elsewhere(self):
        """
        Jobs with a timeout held by a wedged worker come back within timeout
        + grace; the master drops that worker, a real worker runs them, and
        leaving C{with ClusterExecutor} does not block.
        """
        timeout, grace = 2.0, 1.0

        def body():
            address = self.procs.start_master("--deadline-grace", str(grace), "--heartbeat", "0.5")
            wedged = in_reactor(silent_worker, address)
            with executor(address) as ex:
                jobs = [ex.submit_with(worker_pid, (n,), timeout=timeout) for n in range(3)]
                wait_until(lambda: len(wedged.jobs) == 2, 30, "the wedged worker to hold 2 jobs")
                real = self.procs.start_worker(1, False)
                wait_until(lambda: wedged.lost_at is not None, 30, "the master to drop the wedged worker")
                held = wedged.lost_at - wedged.got_jobs_at
                # What leaving the block waits for ends: no job stays with the wedged worker.
                done, _ = futures.wait(jobs, timeout=60)
                self.assertEqual(len(done), 3)
            self.assertEqual([f.result() for f in jobs], [real.pid] * 3)
            self.assertLessEqual(held, timeout + grace + 0.5 + SLACK)
            self.assertGreaterEqual(held, timeout + grace - 0.1)
            self.assertGreater(wedged.pings, 0, "it answered heartbeats all along")
            self.assertIn("returned no result", self.procs.log_tail(self.procs.master, 200))

        return threads.deferToThread(body)

    def test_job_timeout_once_attempts_run_out(self):
        """With no attempts left, the job fails with JobTimeout after timeout + grace."""
        timeout, grace = 1.0, 1.0

        def body():
            address = self.procs.start_master("--deadline-grace", str(grace), "--max-attempts", "1")
            wedged = in_reactor(silent_worker, address)
            with executor(address) as ex:
                future = ex.submit_with(square, (3,), timeout=timeout)
                wait_until(lambda: wedged.jobs, 30, "the wedged worker to get the job")
                error = future.exception(timeout=timeout + grace + 0.5 + SLACK + 10)
                took = time.monotonic() - wedged.got_jobs_at
            self.assertIsInstance(error, JobTimeout)
            self.assertIn("--deadline-grace", str(error))
            self.assertEqual(error.report["hosts"], [error.host])
            self.assertLessEqual(took, timeout + grace + 0.5 + SLACK)

        return threads.deferToThread(body)


class HeartbeatEndToEndTests(unittest.TestCase):
    """Clients and the master notice each other's silence within their bounds."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def stop_master(self) -> None:
        os.kill(self.procs.master.pid, signal.SIGSTOP)
        # Runs before the Processes cleanup that stops it by PID.
        master = self.procs.master
        self.addCleanup(lambda: master.poll() is None and os.kill(master.pid, signal.SIGCONT))

    def test_stopped_master_fails_outstanding_jobs(self):
        """
        A SIGSTOPped master: the futures of a ClusterExecutor and the
        wait() of a ClientThread raise MasterUnavailable within
        master_timeout and a quarter; until then a healthy master keeps
        them connected past that time.
        """
        bound = 3.0

        def body():
            address = self.procs.start_master()
            ex = ClusterExecutor(address, master_timeout=bound, reconnect_timeout=0)
            thread = ClientThread(host=address, master_timeout=bound, reconnect_timeout=0)
            try:
                thread.start()
                future = ex.submit(square, 3)  # no worker: it stays queued
                thread.submit("job", square, 4)
                time.sleep(bound + 1.5)  # longer than the bound: heartbeats keep it alive
                self.assertEqual(ex.status()["queued"], 2)
                self.assertFalse(future.done())
                self.stop_master()
                stopped = time.monotonic()
                error = future.exception(timeout=bound * 1.25 + SLACK + 10)
                future_took = time.monotonic() - stopped
                thread_error = self.assertRaises(MasterUnavailable, thread.wait, bound * 1.25 + SLACK + 10)
                thread_took = time.monotonic() - stopped
            finally:
                ex.shutdown(wait=False)
                thread.close()
            self.assertIsInstance(error, MasterUnavailable)
            self.assertIn("gave no sign of life", str(error))
            self.assertIn("gave no sign of life", str(thread_error))
            self.assertLessEqual(future_took, bound * 1.25 + SLACK)
            self.assertLessEqual(thread_took, bound * 1.25 + SLACK)

        return threads.deferToThread(body)

    def test_silent_client_dropped(self):
        """
        A client that stops answering is dropped with its jobs within
        --client-timeout plus a heartbeat; one that answers stays.
        """
        client_timeout, heartbeat = 2.0, 0.5

        def body():
            address = self.procs.start_master(
                "--client-timeout", str(client_timeout), "--heartbeat", str(heartbeat)
            )
            mute, mute_id = in_reactor(mute_client, address)
            with executor(address) as ex:
                wait_until(
                    lambda: mute.lost_at is not None, client_timeout * 3 + 10, "the master to drop the client"
                )
                silent = mute.lost_at - mute.sent_last
                status = ex.status()
            ids = [c["id"] for c in status["clients"]]
            self.assertNotIn(mute_id, ids)
            self.assertIn(ex.session.client_id, ids, "a client that answers is kept")
            self.assertEqual(status["queued"], 0, "the dropped client's job went with it")
            self.assertLessEqual(silent, client_timeout + heartbeat + SLACK)
            self.assertGreaterEqual(silent, client_timeout - heartbeat)
            self.assertIn("gave no sign of life", self.procs.log_tail(self.procs.master, 200))

        return threads.deferToThread(body)


# -- a slow link -------------------------------------------------------------


class _Forward(Protocol):
    """One side of L{ThrottledProxy}: writes what it receives to its peer side."""

    peer: _Forward | None = None

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate
        self.received = 0
        self.started: float | None = None

    def dataReceived(self, data):
        self.peer.transport.write(data)
        if self.rate is None:
            return
        if self.started is None:
            self.started = reactor.seconds()
        self.received += len(data)
        delay = self.started + self.received / self.rate - reactor.seconds()
        if delay > 0:
            # Read no more until the link would have carried this: the sender's
            # kernel buffers fill and its writes wait, as on a slow link.
            self.transport.pauseProducing()
            reactor.callLater(delay, self.transport.resumeProducing)

    def connectionLost(self, reason):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Inbound(_Forward):
    """The side a worker connects to; the master's replies come through slowly."""

    def __init__(self, master_port: int, rate: float) -> None:
        super().__init__()
        self.master_port = master_port
        self.link_rate = rate

    def connectionMade(self):
        self.transport.pauseProducing()  # until the master's side is up
        outbound = _Forward(self.link_rate)
        outbound.peer, self.peer = self, outbound
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.master_port), outbound)

        def connected(proto):
            # Small buffers, so that the link's rate shows at once.
            proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            self.transport.resumeProducing()

        d.addCallbacks(connected, lambda _: self.transport.loseConnection())


def throttled_proxy(testcase, master_address: str, rate: float) -> int:
    """Listen on a loopback port whose connections reach the master, the master's side at C{rate} B/s."""
    master_port = int(re.search(r"([0-9]+)$", master_address).group(1))
    factory = Factory.forProtocol(lambda: _Inbound(master_port, rate))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


class SlowLinkTests(unittest.TestCase):
    """
    A big job on a slow link to its worker: the master's heartbeat waits
    behind the job's payload, and the worker, busy receiving it, sends
    nothing; the worker taking the payload in is a sign of life, so it is
    not dropped as silent however long the transfer takes.
    """

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_big_job_on_slow_link(self):
        heartbeat, silence, size, rate = 0.5, 2.0, 24 << 20, 3 << 20
        arguments_travel(self)  # the argument crosses the slow link, not the client's memory

        def body():
            address = self.procs.start_master(
                "--heartbeat", str(heartbeat), "--heartbeat-timeout", str(silence), "--max-attempts", "1"
            )
            proxy = threads.blockingCallFromThread(reactor, throttled_proxy, self, address, rate)
            self.procs.start_worker(1, True, address=f"127.0.0.1:{proxy}")
            with executor(address) as ex:
                started = time.monotonic()
                self.assertEqual(ex.submit(len, bytes(size)).result(120), size)
                took = time.monotonic() - started
            log = self.procs.log_tail(self.procs.master, 300)
            self.assertNotIn("no answer to heartbeats", log)
            # The transfer outlasted the heartbeat timeout several times over.
            self.assertGreater(took, 3 * silence)

        return threads.deferToThread(body)
