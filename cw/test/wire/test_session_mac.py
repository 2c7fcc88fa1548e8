"""
Authentication is bound to the connection: after the handshake every box
carries a MAC under keys only the two ends know (L{cw.wire.auth}), so a man in
the middle can only pass bytes through unchanged.  Real master, worker and
client over loopback, with a relay in between that forwards the handshake
and then tampers; plus the messages about wrong secrets and the escaping of
what unauthenticated peers send.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import struct
import threading
import time

import cloudpickle
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionClosed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import formatEventAsClassicLogText, globalLogPublisher
from twisted.protocols import amp
from twisted.trial import unittest

from cw.client import ClusterExecutor, MasterUnavailable
from cw.client.session import client_context
from cw.errors import AuthenticationFailed
from cw.master.service import Master
from cw.test.e2e.test_security import host_port, other_secret, raw_box
from cw.test.jobs import digest, square, touch
from cw.test.peers import GatedAMP, authenticated_to_master, connect_to_master
from cw.test.procs import DEADLINE, Processes, arguments_travel, executor, memory_files, wait_until
from cw.test.wire.test_streaming import pattern
from cw.wire import commands as P
from cw.wire.auth import (
    _MAC_HEAD,
    MAC_BYTES,
    MAC_KEY,
    REFUSED_RETRY_MAX,
    AuthGate,
    BoxMac,
    WrongSecretLog,
    refused_retry_delay,
    session_keys,
)
from cw.wire.commands import Challenge, Prove
from cw.wire.memfile import placed
from cw.wire.streaming import PIECE, ChunkReceiver, StreamingSender

_LENGTH = struct.Struct("!H")


class Touches:
    """Unpickling this calls L{touch}: a forged result that shows it was opened."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return touch, (self.path,)


def one_way_box(command, **kwargs) -> bytes:
    """The wire bytes of C{command}, which wants no answer (so none reaches the master)."""
    box = command.makeArguments(kwargs, None)
    box[b"_command"] = command.commandName
    return box.serialize()


def with_mac(raw: bytes, mac: bytes) -> bytes:
    """A box's wire bytes C{raw} with a C{_mac} value appended (a forgery)."""
    return raw[:-2] + _LENGTH.pack(len(MAC_KEY)) + MAC_KEY + _LENGTH.pack(len(mac)) + mac + b"\0\0"


class BoxStream:
    """Cuts a byte stream into whole AMP boxes: their wire bytes and keys/values."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, dict]]:
        self.buffer += data
        boxes = []
        while True:
            box, pos, buf = {}, 0, self.buffer
            while True:
                if len(buf) < pos + 2:
                    return boxes
                (n,) = _LENGTH.unpack_from(buf, pos)
                if n == 0:
                    pos += 2
                    break
                if len(buf) < pos + 4 + n:
                    return boxes
                key = bytes(buf[pos + 2 : pos + 2 + n])
                (m,) = _LENGTH.unpack_from(buf, pos + 2 + n)
                start = pos + 4 + n
                if len(buf) < start + m:
                    return boxes
                box[key] = bytes(buf[start : start + m])
                pos = start + m
            boxes.append((bytes(buf[:pos]), box))
            del buf[:pos]


class _End(Protocol):
    """One side of a relayed connection: hands whole boxes to the relay."""

    def __init__(self, link: RelayedConnection, direction: str) -> None:
        self.link = link
        self.direction = direction
        self.stream = BoxStream()

    def dataReceived(self, data):
        for raw, box in self.stream.feed(data):
            self.link.received(self.direction, raw, box)

    def connectionLost(self, reason):
        self.link.lost()


class RelayedConnection:
    """
    A peer's connection through the relay to the master.  Boxes going
    C{"up"} (peer to master) and C{"down"} are numbered from 0 per
    direction and handed to the relay's C{tamper(link, direction, index,
    raw, box)}, which forwards them (L{send}) as it likes.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.number = relay.connections
        self.peer = _End(self, "up")
        self.master: _End | None = None
        self.waiting: list[bytes] = []
        self.counts = {"up": 0, "down": 0}

    def received(self, direction: str, raw: bytes, box: dict) -> None:
        index = self.counts[direction]
        self.counts[direction] += 1
        self.relay.tamper(self, direction, index, raw, box)

    def send(self, direction: str, raw: bytes) -> None:
        if direction == "down":
            self.peer.transport.write(raw)
        elif self.master is None:
            self.waiting.append(raw)
        else:
            self.master.transport.write(raw)

    def lost(self) -> None:
        for end in (self.peer, self.master):
            if end is not None and end.transport is not None:
                end.transport.loseConnection()


class Relay:
    """
    A man in the middle on loopback that holds no secret: it accepts peers
    and relays each to the master at C{target}, box by box, through
    C{tamper} (by default: pass everything through unchanged).
    """

    def __init__(self, testcase: unittest.TestCase, target: tuple[str, int], tamper=None) -> None:
        self.target = target
        self.connections = 0
        if tamper is not None:
            self.tamper = tamper
        self.port = reactor.listenTCP(0, Factory.forProtocol(self._accept), interface="127.0.0.1")
        testcase.addCleanup(self.port.stopListening)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    def tamper(self, link: RelayedConnection, direction: str, index: int, raw: bytes, box: dict) -> None:
        link.send(direction, raw)

    def _accept(self):
        self.connections += 1
        link = RelayedConnection(self)
        endpoint = TCP4ClientEndpoint(reactor, *self.target)

        def connected(end):
            link.master = end
            for raw in link.waiting:
                end.transport.write(raw)
            link.waiting = []

        def failed(_):
            link.lost()

        connectProtocol(endpoint, _End(link, "down")).addCallbacks(connected, failed)
        return link.peer


def log_lines(path) -> list[str]:
    return open(path, errors="replace").read().splitlines()


class RelayTests(unittest.TestCase):
    """A relay that forwards the handshake and then speaks for itself gets nowhere."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_injected_box_towards_worker_refused(self):
        """
        A relay between a real worker and the real master forwards the
        handshake and the registration, then sends the worker its own
        C{RunJobs} (with a forged MAC): the worker drops the connection,
        saying so with the relay's address first, and never runs the job.
        """
        marker = os.path.abspath(self.mktemp())
        job = P.Job(77, 1, cloudpickle.dumps((touch, (marker,), {})))
        injected = threading.Event()

        def tamper(link, direction, index, raw, box):
            link.send(direction, raw)
            # Down: 0 answers Challenge, 1 Prove, 2 RegisterWorker.
            if direction == "down" and index == 2 and link.number == 1:
                forged = os.urandom(MAC_BYTES)
                link.send(
                    "down",
                    with_mac(one_way_box(P.ClientContext, client=77, context=client_context()), forged),
                )
                link.send("down", with_mac(one_way_box(P.RunJobs, jobs=[job]), forged))
                injected.set()

        def body():
            self.procs.start_master()
            relay = blockingCallFromThread(reactor, Relay, self, host_port(self.procs.address), tamper)
            worker = self.procs.start_worker(1, False, address=relay.address)
            self.assertTrue(injected.wait(DEADLINE), "the relay never got past the handshake")
            wait_until(
                lambda: os.path.exists(marker) or "wrong MAC" in self.procs.log_tail(worker, 200),
                what="the worker to run or refuse the injected job",
            )
            self.assertFalse(os.path.exists(marker), "the worker ran a job injected by the relay")
            line = next(line for line in log_lines(worker.log) if "wrong MAC" in line)
            self.assertRegex(
                line, r"\] 127\.0\.0\.1:\d+: dropping the connection: sent a box with a wrong MAC"
            )

        return threads.deferToThread(body)

    def test_injected_result_towards_client_refused(self):
        """
        A relay between a client and the master forwards the handshake, then
        answers the client's job with its own C{JobResults} (a pickle that
        would run code when opened): the client never opens it and its
        future fails with an error that says why.
        """
        marker = os.path.abspath(self.mktemp())

        def tamper(link, direction, index, raw, box):
            link.send(direction, raw)
            if direction == "up" and box.get(b"_command") == P.SubmitJobs.commandName:
                (job,) = P.decode_jobs(box[b"jobs"])
                forged = P.Result(job.client, job.seq, P.Outcome.OK, cloudpickle.dumps(Touches(marker)))
                link.send("down", one_way_box(P.JobResults, results=[forged]))

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            relay = blockingCallFromThread(reactor, Relay, self, host_port(self.procs.address), tamper)
            ex = ClusterExecutor(relay.address)
            try:
                error = ex.submit(square, 7).exception(DEADLINE)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
            self.assertFalse(os.path.exists(marker), "the client unpickled a result forged by the relay")
            self.assertIsInstance(error, MasterUnavailable)
            self.assertIn("without a MAC", str(error))

        return threads.deferToThread(body)

    def test_flipped_payload_byte_fails_the_connection(self):
        """
        A proxy that flips one byte of a job's 2 MB payload (a streamed box)
        after authentication: the master drops the connection, logging why,
        and the client gets an error, never a changed result.
        """
        data = b"a" * 2_000_000
        flipped = threading.Event()
        arguments_travel(self)  # the payload crosses the proxy

        def tamper(link, direction, index, raw, box):
            if (
                direction == "up"
                and box.get(b"_command") == P.SubmitJobs.commandName
                and not flipped.is_set()
            ):
                at = raw.index(b"a" * 1000) + 500
                raw = raw[:at] + b"b" + raw[at + 1 :]
                flipped.set()
            link.send(direction, raw)

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            relay = blockingCallFromThread(reactor, Relay, self, host_port(self.procs.address), tamper)
            ex = ClusterExecutor(relay.address, reconnect_timeout=0)
            try:
                future = ex.submit(digest, data)
                error = future.exception(DEADLINE)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
            self.assertTrue(flipped.is_set())
            if error is None:
                self.fail(f"the job returned {future.result()!r} from a changed payload")
            self.assertIsInstance(error, MasterUnavailable)
            log = self.procs.log_tail(self.procs.master, 200)
            self.assertRegex(log, r"127\.0\.0\.1:\d+: dropping the connection: sent a box with a wrong MAC")

        return threads.deferToThread(body)

    def run_tampered_submits(self, tamper, held: threading.Event):
        """
        Submit one job, wait until the relay has C{held} its box, submit a
        second; return both futures' exceptions and the master's log.
        """
        self.procs.start_master()
        self.procs.start_worker()
        relay = blockingCallFromThread(reactor, Relay, self, host_port(self.procs.address), tamper)
        ex = ClusterExecutor(relay.address, reconnect_timeout=0)
        try:
            first = ex.submit(square, 3)
            self.assertTrue(held.wait(DEADLINE), "the relay saw no SubmitJobs")
            try:
                second = ex.submit(square, 4)
            except MasterUnavailable as e:  # the client already knows the connection is gone
                errors = [first.exception(DEADLINE), e]
            else:
                errors = [first.exception(DEADLINE), second.exception(DEADLINE)]
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
        return errors, self.procs.log_tail(self.procs.master, 200)

    def test_replayed_box_refused(self):
        """A relay that sends one of the client's boxes twice: the master drops the connection."""
        held = threading.Event()

        def tamper(link, direction, index, raw, box):
            link.send(direction, raw)
            if direction == "up" and box.get(b"_command") == P.SubmitJobs.commandName and not held.is_set():
                link.send(direction, raw)
                held.set()

        def body():
            errors, log = self.run_tampered_submits(tamper, held)
            self.assertIsInstance(errors[0], MasterUnavailable)
            self.assertRegex(log, r"127\.0\.0\.1:\d+: dropping the connection: sent box \d+ out of sequence")
            self.assertIn("replayed or reordered", log)

        return threads.deferToThread(body)

    def test_reordered_boxes_refused(self):
        """A relay that swaps two of the client's boxes: the master drops the connection."""
        held = threading.Event()
        kept: list[bytes] = []

        def tamper(link, direction, index, raw, box):
            if direction == "up" and box.get(b"_command") == P.SubmitJobs.commandName:
                if not held.is_set():
                    kept.append(raw)  # held back until the next box
                    held.set()
                    return
                if kept:
                    link.send(direction, raw)
                    raw = kept.pop()
            link.send(direction, raw)

        def body():
            errors, log = self.run_tampered_submits(tamper, held)
            self.assertEqual([type(e) for e in errors], [MasterUnavailable, MasterUnavailable])
            self.assertRegex(log, r"127\.0\.0\.1:\d+: dropping the connection: sent box \d+ out of sequence")

        return threads.deferToThread(body)

    def test_reflected_box_refused(self):
        """
        A relay that sends the master one of its own signed boxes back (its
        answer to the client's registration): each direction has its own
        key, so the master drops the connection.
        """

        def tamper(link, direction, index, raw, box):
            link.send(direction, raw)
            if direction == "down" and b"client_id" in box:
                link.send("up", raw)

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            relay = blockingCallFromThread(reactor, Relay, self, host_port(self.procs.address), tamper)
            with self.assertRaises(MasterUnavailable):
                with executor(relay.address, reconnect_timeout=0) as ex:
                    ex.submit(square, 2).result(DEADLINE)
            self.assertRegex(
                self.procs.log_tail(self.procs.master, 200),
                r"127\.0\.0\.1:\d+: dropping the connection: sent a box with a wrong MAC",
            )

        return threads.deferToThread(body)

    def test_honest_relay_passes(self):
        """A relay that passes bytes through unchanged is invisible: jobs, big payloads and results."""
        arguments_travel(self)  # the big payload crosses the relay, not the client's memory
        data = os.urandom(3_000_000)

        def body():
            self.procs.start_master()
            relay = blockingCallFromThread(reactor, Relay, self, host_port(self.procs.address))
            self.procs.start_worker(1, False, address=relay.address)
            wait_until(
                lambda: "Registered with the master" in self.procs.log_tail(self.procs.workers[0], 100)
            )
            with executor(relay.address) as ex:
                self.assertEqual(
                    list(ex.map(square, range(50), timeout=DEADLINE)), [x * x for x in range(50)]
                )
                self.assertEqual(ex.submit(digest, data).result(DEADLINE), digest(data))

        return threads.deferToThread(body)


class SessionUnitTests(unittest.SynchronousTestCase):
    """The pure parts: keys, box MACs, back-off, warning rate."""

    def test_keys_differ_per_direction_and_connection(self):
        secret = b"s" * 32
        a = session_keys(secret, "worker", b"p" * 32, b"m" * 32)
        self.assertNotEqual(a[0], a[1])
        self.assertNotEqual(a, session_keys(secret, "worker", b"p" * 32, b"n" * 32))
        self.assertNotEqual(a, session_keys(secret, "client", b"p" * 32, b"m" * 32))
        self.assertNotEqual(a, session_keys(b"t" * 32, "worker", b"p" * 32, b"m" * 32))

    def test_box_mac_round_trip_and_sequence(self):
        signer, checker = BoxMac(b"k" * 32), BoxMac(b"k" * 32)
        boxes = [signer.sign(b"box %d" % i) for i in range(3)]

        def check(wire: bytes):
            body, value = wire[: -len(_MAC_HEAD) - MAC_BYTES - 2], wire[-MAC_BYTES - 2 : -2]
            mac = checker.start()
            mac.update(body)
            return checker.check(mac, value)

        self.assertIsNone(check(boxes[0]))
        self.assertIn("out of sequence", check(boxes[0]))
        self.assertIn("out of sequence", check(boxes[2]))
        self.assertIsNone(check(boxes[1]))
        self.assertIn("wrong MAC", check(boxes[2].replace(b"box", b"bix")))
        other = BoxMac(b"x" * 32)
        other.sequence = 2
        self.assertIn("wrong MAC", check(other.sign(b"box 2")))
        self.assertIn("without a MAC", checker.check(checker.start(), None))

    def test_refused_retry_delay_doubles_to_a_bound(self):
        self.assertEqual([refused_retry_delay(n, 0.5) for n in (1, 2, 3, 4)], [0.5, 1, 2, 4])
        self.assertEqual(refused_retry_delay(100, 0.5), REFUSED_RETRY_MAX)
        self.assertEqual(refused_retry_delay(10**6, 5), REFUSED_RETRY_MAX)
        self.assertEqual(refused_retry_delay(3, 600), 600)

    def test_wrong_secret_log_once_per_address_per_interval(self):
        clock = Clock()
        log = WrongSecretLog(clock, interval=60, size=2)
        self.assertEqual(log.failed("a"), 0)
        self.assertIsNone(log.failed("a"))
        self.assertIsNone(log.failed("a"))
        self.assertEqual(log.failed("b"), 0)
        clock.advance(61)
        self.assertEqual(log.failed("a"), 2)
        self.assertEqual(log.failed("c"), 0)  # forgets the oldest address, "b"
        self.assertEqual(log.failed("b"), 0)


class SignedPeer(StreamingSender, AuthGate, ChunkReceiver, amp.AMP):
    """Both halves of a cw connection, as master, worker and client combine them."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list = []

    def ampBoxReceived(self, box):
        self.boxes.append(box)


class FileSignedPeer(SignedPeer):
    """A L{SignedPeer} that receives big batches into memory files, as a worker does."""

    def assemble_in_file(self, name, first):
        return 0 if name == b"jobs" else None


class SignedStreamTests(unittest.SynchronousTestCase):
    """Big boxes are signed piece by piece as they stream, and checked as they arrive."""

    def setUp(self):
        keys = session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32)
        self.sender, self.receiver = SignedPeer(), SignedPeer()
        self.transport = StringTransport()
        self.sender.makeConnection(self.transport)
        self.receiver.makeConnection(StringTransport())
        self.sender.start_session(*keys)
        self.receiver.start_session(*reversed(keys))
        self.receiver.mark_authenticated()

    def send(self, *boxes) -> bytes:
        for box in boxes:
            self.sender.sendBox(box)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.transport.value()

    def test_streamed_and_small_boxes_verify(self):
        payload = pattern(3 * PIECE + 5)
        big = amp.AmpBox()
        P.JobBatch().toBox(b"jobs", big, {"jobs": [P.Job(1, 1, payload)]}, None)
        wire = self.send(big, amp.AmpBox(_command=b"x"))
        self.assertEqual(wire.count(MAC_KEY), 2, "one MAC per box")
        for at in range(0, len(wire), 7919):  # arrives in odd pieces
            self.receiver.dataReceived(wire[at : at + 7919])
        self.assertIsNone(self.receiver.rejected)
        self.assertEqual(len(self.receiver.boxes), 2)
        self.assertEqual(P.decode_jobs(self.receiver.boxes[0][b"jobs"])[0].payload, payload)
        self.assertNotIn(MAC_KEY, self.receiver.boxes[0])

    def test_changed_byte_in_a_streamed_box_refused(self):
        big = amp.AmpBox()
        P.JobBatch().toBox(b"jobs", big, {"jobs": [P.Job(1, 1, b"a" * (2 * PIECE))]}, None)
        wire = bytearray(self.send(big))
        wire[PIECE + 3] ^= 1
        self.receiver.dataReceived(bytes(wire))
        self.assertIn("wrong MAC", self.receiver.rejected)
        self.assertEqual(self.receiver.boxes, [])

    def test_changed_byte_refused_however_cut(self):
        """
        A changed byte inside a chunk that the receiver reads straight into
        its buffer (L{cw.wire.streaming.ChunkReceiver}) fails the MAC, however
        the bytes are cut into reads, and no box is dispatched.
        """
        keys = session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32)
        big = amp.AmpBox()
        P.JobBatch().toBox(b"jobs", big, {"jobs": [P.Job(1, 1, pattern(2 * PIECE))]}, None)
        wire = bytearray(self.send(big))
        wire[PIECE + 3] ^= 1
        gc.collect()
        files = memory_files()
        for size, peer in itertools.product((1000, P.CHUNK + 2, 1 << 16), (SignedPeer, FileSignedPeer)):
            receiver = peer()
            receiver.makeConnection(StringTransport())
            receiver.start_session(*reversed(keys))
            receiver.mark_authenticated()
            for at in range(0, len(wire), size):
                receiver.dataReceived(bytes(wire[at : at + size]))
            self.assertIn("wrong MAC", receiver.rejected or "", f"reads of {size} by {peer.__name__}")
            self.assertEqual(receiver.boxes, [])
            del receiver
            gc.collect()
            self.assertEqual(memory_files(), files, "no file left of a refused box")

    def test_box_received_into_a_file_verifies(self):
        """A signed big box whose value a peer receives into a memory file arrives intact, once checked."""
        receiver = FileSignedPeer()
        receiver.makeConnection(StringTransport())
        receiver.start_session(*session_keys(b"s" * 32, "master", b"m" * 32, b"p" * 32)[::-1])
        self.sender.start_session(*session_keys(b"s" * 32, "master", b"m" * 32, b"p" * 32))
        receiver.mark_authenticated()
        payload = pattern(3 * PIECE + 5)
        big = amp.AmpBox()
        P.JobBatch().toBox(b"jobs", big, {"jobs": [P.Job(1, 1, payload)]}, None)
        wire = self.send(big)
        for at in range(0, len(wire), 7919):
            receiver.dataReceived(wire[at : at + 7919])
        self.assertIsNone(receiver.rejected)
        [box] = receiver.boxes
        self.assertIsNotNone(placed(box[b"jobs"]), "received into a file")
        self.assertEqual(P.decode_jobs(box[b"jobs"])[0].payload, payload)


class WrongSecretTests(unittest.TestCase):
    """Either end with another secret is told so, and nobody hammers anybody."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_client_told_secrets_differ(self):
        """
        A client with another secret hears that the two ends hold different
        secrets (not that the master is an impostor) and which file it
        used; the master logs a warning naming the client's address.
        """
        wrong = other_secret(self)

        def body():
            self.procs.start_master()
            with self.assertRaises(AuthenticationFailed) as caught:
                ClusterExecutor(self.procs.address, secret_file=wrong)
            message = str(caught.exception)
            self.assertIn("hold different secrets", message)
            self.assertIn(f"secret file {wrong}", message)
            self.assertNotIn("impostor", message)
            wait_until(
                lambda: "holds a different secret" in self.procs.log_tail(self.procs.master, 100),
                what="the master's warning",
            )
            self.assertRegex(
                self.procs.log_tail(self.procs.master, 100),
                r"\] 127\.0\.0\.1:\d+: a client failed to authenticate: it holds a different secret",
            )

        return threads.deferToThread(body)

    def test_worker_backs_off_and_master_warns_once(self):
        """
        A worker with another secret says so (naming its secret file) and
        waits twice as long after each refusal; the master, tried five
        times, warns once about the address.
        """
        wrong = other_secret(self)
        attempts = 5

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(
                1, False, "--secret-file", wrong, "--reconnect-delay", "0.2", address=self.procs.address
            )
            seen: list[float] = []
            deadline = time.monotonic() + DEADLINE
            while len(seen) < attempts:
                self.assertLess(time.monotonic(), deadline, "the worker stopped trying")
                count = sum("Could not join" in line for line in log_lines(worker.log))
                seen += [time.monotonic()] * (count - len(seen))
                time.sleep(0.01)
            lines = [line for line in log_lines(worker.log) if "Could not join" in line]
            self.assertIn("hold different secrets", lines[0])
            self.assertIn(f"secret file {wrong}", lines[0])
            delays = [float(re.search(r"trying again in ([0-9.]+) s", line).group(1)) for line in lines]
            self.assertEqual(delays[:attempts], [0.2, 0.4, 0.8, 1.6, 3.2])
            # Without back-off five tries take about four times 0.2 s.
            self.assertGreater(seen[attempts - 1] - seen[0], 0.2 + 0.4 + 0.8 + 1.6 - 0.5)
            warnings = [
                line for line in log_lines(self.procs.master.log) if "holds a different secret" in line
            ]
            self.assertEqual(len(warnings), 1, warnings)
            self.assertIn("a worker failed to authenticate", warnings[0])

        return threads.deferToThread(body)


class LogHygieneTests(unittest.SynchronousTestCase):
    """What an unauthenticated peer sends is logged escaped, after its address."""

    def test_newline_in_role_cannot_forge_a_log_line(self):
        """
        A Challenge whose role holds a newline and a fake log line, then a
        wrong proof, to a master connected in memory: its log (as twistd
        writes it) shows the role escaped on the line that starts with the
        peer's address; no line starts with the forgery.
        """
        forged = "2026-01-01T00:00:00+0000 [cw.master] FORGED Worker 9 joined"
        lines: list[str] = []

        def observe(event):
            lines.extend((formatEventAsClassicLogText(event) or "").splitlines())

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        peer = Protocol()
        _, pump = connect_to_master(Master(Clock(), secret=os.urandom(32), heartbeat=0), peer)
        peer.transport.write(
            raw_box(Challenge, role="client\n" + forged, nonce=os.urandom(32), version=P.PROTOCOL_VERSION)
        )
        peer.transport.write(raw_box(Prove, proof=os.urandom(32)))
        pump.flush()
        lines = [line for line in lines if "FORGED" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(repr("client\n" + forged), lines[0])
        self.assertRegex(lines[0], r"^\S+ \[[^]]*\] 127\.0\.0\.1:\d+: ")


class LyingMaster(amp.AMP):
    """A fake master that answers the handshake with an error holding a fake log line."""

    @Challenge.responder
    def challenge(self, role, nonce, version=None):
        raise AuthenticationFailed("no\n2026-01-01T00:00:00+0000 [cw.worker#info] FORGED Registered")


class WorkerLogHygieneTests(unittest.TestCase):
    """What an unauthenticated master says is logged escaped too."""

    timeout = 120

    def test_error_from_fake_master_escaped(self):
        procs = Processes(self, self.mktemp())

        def body():
            fake = blockingCallFromThread(
                reactor, reactor.listenTCP, 0, Factory.forProtocol(LyingMaster), interface="127.0.0.1"
            )
            self.addCleanup(fake.stopListening)
            worker = procs.start_worker(1, False, address=f"127.0.0.1:{fake.getHost().port}")
            wait_until(lambda: "FORGED" in procs.log_tail(worker, 100), what="the worker to log the refusal")
            lines = [line for line in log_lines(worker.log) if "FORGED" in line]
            self.assertIn("refused to authenticate: 'no\\n2026-01-01", lines[0])
            self.assertTrue(
                all(re.match(r"^\S+ \[cw\.worker#error\] Could not join", line) for line in lines), lines
            )

        return threads.deferToThread(body)


class HandshakeTests(unittest.SynchronousTestCase):
    """Signing is not optional once the handshake is done."""

    def test_unsigned_box_after_handshake_refused_by_master(self):
        """
        A peer that authenticates properly but then sends unsigned boxes
        (as an old cw would) is dropped by the master (connected in
        memory): signing is not optional.
        """
        master = Master(Clock(), secret=os.urandom(32), heartbeat=0)
        peer = GatedAMP()
        server, pump = authenticated_to_master(master, peer, "client")
        signed = peer.callRemote(P.GetStatus)
        pump.flush()
        self.assertIn("status", self.successResultOf(signed))
        peer.box_signer = None  # stop signing
        status = peer.callRemote(P.GetStatus)
        pump.flush()
        self.failureResultOf(status, ConnectionClosed)
        self.assertIn("without a MAC", server.rejected)

    def test_box_going_on_after_its_mac_refused(self):
        """
        A box that arrives whole with a key after its MAC (the MAC must
        close it: whatever follows is not covered) is refused, with a good
        MAC over what came before.
        """
        master = Master(Clock(), secret=os.urandom(32), heartbeat=0)
        peer = GatedAMP()
        server, pump = authenticated_to_master(master, peer, "client")
        box = amp.AmpBox({amp.COMMAND: P.GetStatus.commandName, amp.ASK: b"99"})
        signed = peer.box_signer.sign(memoryview(box.serialize())[:-2])
        extra = amp.AmpBox({b"zz": b"after"}).serialize()
        peer.transport.write(signed[:-2] + extra)
        pump.flush()
        self.assertIn("after its MAC", server.rejected)
