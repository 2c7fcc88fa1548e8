"""
Tests for L{cw.wire.streaming.StreamingSender} writing streamed boxes
straight to a plain TCP socket, many pieces per system call (C{sendmsg}),
none joined; and for its fallback to Twisted's write path (TLS), over
real loopback connections.
"""

from __future__ import annotations

import hashlib
import socket
import tracemalloc

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import (
    SSL4ClientEndpoint,
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
)
from twisted.protocols import amp
from twisted.trial import unittest

from cw.test.peers import pattern
from cw.test.procs import until
from cw.test.wire.test_forwarding import Middle, connected, drain, result_box
from cw.test.wire.test_session_mac import SignedPeer
from cw.wire import commands as P
from cw.wire import forwarding, private, streaming
from cw.wire.auth import AuthGate, session_keys
from cw.wire.streaming import SEND_AT_ONCE, ChunkReceiver, StreamingSender, box_pieces

KEYS = session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32)


class Peer(StreamingSender, AuthGate, ChunkReceiver, amp.AMP):
    """Either end of a cw connection: streams what it sends, assembles what it receives."""

    #: Sign boxes sent and check boxes received (as cw's sessions do).
    signed = False
    #: Read one piece at a time, at the reactor's next turn (a slow reader).
    slow = False

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list = []
        #: Bytes this side said it sent past the transport (L{stream_sent}).
        self.sent_past = 0

    def stream_sent(self, size):
        self.sent_past += size

    def connectionMade(self):
        super().connectionMade()
        if self.signed:
            self.start_session(*(KEYS if self.factory.sends else KEYS[::-1]))
        self.mark_authenticated()
        self.factory.made.append(self)

    def dataReceived(self, data):
        super().dataReceived(data)
        if self.slow and self.transport.connected:
            self.transport.pauseProducing()
            reactor.callLater(0, self.transport.resumeProducing)

    def ampBoxReceived(self, box):
        self.boxes.append(box)


class Sink(protocol.Protocol):
    """Takes in a byte stream, keeping only its length and hash."""

    def connectionMade(self):
        self.received = 0
        self.hash = hashlib.sha256()
        self.factory.made.append(self)

    def dataReceived(self, data):
        self.received += len(data)
        self.hash.update(data)


def factory(kind, sends: bool, **attributes) -> protocol.Factory:
    made = protocol.Factory.forProtocol(type(kind.__name__, (kind,), attributes))
    made.made, made.sends = [], sends
    return made


def big_box(payload) -> amp.AmpBox:
    """A batch of two jobs, the first with C{payload} (chunked as cw sends it)."""
    box = amp.AmpBox()
    P.JobBatch().toBox(b"jobs", box, {"jobs": [P.Job(1, 1, payload), P.Job(1, 2, b"small")]}, None)
    return box


class Calls:
    """Counts L{streaming.send_buffers}'s calls: bytes asked to send and sent, per call."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.calls: list[tuple[int, int]] = []
        real = streaming.send_buffers

        def counted(sock, buffers):
            sent = real(sock, buffers)
            self.calls.append((sum(len(buffer) for buffer in buffers), sent))
            return sent

        test.patch(streaming, "send_buffers", counted)


class SendmsgTests(unittest.TestCase):
    """Big boxes over real loopback TCP connections (and TLS), content-checked byte for byte."""

    timeout = 60

    @defer.inlineCallbacks
    def connect(self, receiver: protocol.Factory, sender: protocol.Factory, tls: bool = False):
        """The sending and receiving protocols of a new loopback connection (C{tls}: over TLS)."""
        if tls:
            import trustme  # a test dependency, for TLS only

            ca = trustme.CA()
            issued = ca.issue_cert("localhost")
            server = ssl.PrivateCertificate.loadPEM(issued.private_key_and_cert_chain_pem.bytes()).options()
            client = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(ca.cert_pem.bytes()))
            listening = SSL4ServerEndpoint(reactor, 0, server, interface="127.0.0.1")
        else:
            listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = yield listening.listen(receiver)
        self.addCleanup(port.stopListening)
        if tls:
            connecting = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, client)
        else:
            connecting = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        proto = yield connecting.connect(sender)
        self.addCleanup(proto.transport.loseConnection)
        yield until(lambda: receiver.made, what="the connection accepted")
        self.addCleanup(receiver.made[0].transport.loseConnection)
        return proto, receiver.made[0]

    @defer.inlineCallbacks
    def intact_through_partial_sends(self, signed: bool):
        """
        A streamed box and a small one after it arrive intact, over a
        socket that takes only some bytes per call (a small send buffer)
        to a slow reader that reads nothing at first; the big box went
        through C{sendmsg}, of more than one piece per call, whose
        unsent rest was sent later.
        """
        calls = Calls(self)
        sender, receiver = yield self.connect(
            factory(Peer, False, signed=signed, slow=True), factory(Peer, True, signed=signed)
        )
        sender.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        receiver.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        receiver.transport.pauseProducing()
        payload = pattern(SEND_AT_ONCE + (SEND_AT_ONCE >> 1) + 17)
        sender.sendBox(big_box(payload))
        sender.sendBox(amp.AmpBox(after=b"x"))
        yield until(lambda: calls.calls and calls.calls[-1][1] < calls.calls[-1][0], what="a partial send")
        receiver.transport.resumeProducing()
        yield until(lambda: len(receiver.boxes) == 2 or receiver.rejected, what="both boxes")
        self.assertIsNone(receiver.rejected)
        jobs = P.decode_jobs(receiver.boxes[0][b"jobs"])
        self.assertEqual([job.payload == payload for job in jobs], [True, False])
        self.assertEqual(bytes(jobs[1].payload), b"small")
        self.assertEqual(receiver.boxes[1][b"after"], b"x")
        asked = sum(size for size, _ in calls.calls)
        sent = sum(sent for _, sent in calls.calls)
        self.assertGreater(asked, sent, "some calls sent part of what they were given")
        self.assertGreater(max(size for size, _ in calls.calls), 1 << 20, "many pieces per call")
        self.assertGreaterEqual(sent, len(payload), "the payload went through sendmsg")
        self.assertEqual(sender.sent_past, sent, "each byte sent past the transport is told")
        self.assertIsNone(sender._outgoing)
        self.assertEqual(sender.outgoing_bytes, 0)

    def test_intact_through_partial_sends(self):
        return self.intact_through_partial_sends(signed=False)

    def test_intact_through_partial_sends_signed(self):
        return self.intact_through_partial_sends(signed=True)

    @defer.inlineCallbacks
    def no_copy(self, signed: bool):
        """
        Sending a 32 MiB streamed box allocates far less than one of
        Twisted's 1 MiB pieces: its pieces are sent where they lie, never
        joined (measured with tracemalloc while it is sent).
        """
        calls = Calls(self)
        sender, sink = yield self.connect(factory(Sink, False), factory(Peer, True, signed=signed))
        box = big_box(pattern(32 << 20))
        length = sum(len(piece) for piece in box_pieces(box))
        expected = hashlib.sha256()
        for piece in box_pieces(box):
            expected.update(piece)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        sender.sendBox(box)
        yield until(lambda: sink.received >= length, what="the box received")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.assertLess(peak, 256 << 10, "bytes allocated at most while 32 MiB were sent")
        self.assertGreater(len(calls.calls), 0)
        if signed:
            self.assertGreater(sink.received, length, "the MAC's trailer follows")
        else:
            self.assertEqual(sink.received, length)
            self.assertEqual(sink.hash.digest(), expected.digest())

    def test_no_copy(self):
        return self.no_copy(signed=False)

    def test_no_copy_signed(self):
        return self.no_copy(signed=True)

    @defer.inlineCallbacks
    def test_tls_written_through_twisted(self):
        """Over TLS a streamed box goes through Twisted's (and OpenSSL's) write path, not sendmsg; intact."""
        calls = Calls(self)
        sender, receiver = yield self.connect(
            factory(Peer, False, signed=True, slow=True), factory(Peer, True, signed=True), tls=True
        )
        self.assertIsNone(private.sending_socket(sender.transport))
        payload = pattern(3 << 20)
        sender.sendBox(big_box(payload))
        sender.sendBox(amp.AmpBox(after=b"x"))
        yield until(lambda: len(receiver.boxes) == 2 or receiver.rejected, what="both boxes")
        self.assertIsNone(receiver.rejected)
        self.assertEqual(P.decode_jobs(receiver.boxes[0][b"jobs"])[0].payload, payload)
        self.assertEqual(receiver.boxes[1][b"after"], b"x")
        self.assertEqual(calls.calls, [])

    @defer.inlineCallbacks
    def test_not_past_buffered_bytes_or_closing(self):
        """
        L{private.sending_socket}: none while Twisted holds bytes for the
        connection (they go first) or it is closing; the connection's
        socket otherwise.
        """
        sender, _ = yield self.connect(factory(Sink, False), factory(Peer, True))
        transport = sender.transport
        self.assertIs(private.sending_socket(transport), transport.getHandle())
        transport.write(b"waiting")
        self.assertIsNone(private.sending_socket(transport))
        yield until(lambda: private.sending_socket(transport) is not None, what="the buffer drained")
        transport.loseConnection()
        self.assertIsNone(private.sending_socket(transport))
        self.assertIsNone(private.sending_socket(object()))

    @defer.inlineCallbacks
    def forwarded(self, signed: bool):
        """
        A box forwarded as it arrives (a L{forwarding.Relay}, as the
        master passes a worker's result on) to a real TCP connection
        whose socket takes only some bytes per call, read slowly: it
        arrives intact, and what the relay had went to the socket as it
        lay (C{sendmsg}), never joined by L{forwarding.Relay.take}.
        """
        calls = Calls(self)
        joined = []
        take = forwarding.Relay.take

        def counted(relay, limit):
            taken, done = take(relay, limit)
            if taken:
                joined.append(len(taken))
            return taken, done

        self.patch(forwarding.Relay, "take", counted)
        out, receiver = yield self.connect(
            factory(Peer, False, signed=signed, slow=True), factory(Peer, True, signed=signed)
        )
        out.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        receiver.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        receiver.transport.pauseProducing()
        source, middle = SignedPeer(), Middle()
        middle.destination = out
        keys = session_keys(b"s" * 32, "worker", b"p" * 32, b"m" * 32) if signed else None
        sent = connected(source, middle, keys)
        payload = pattern(SEND_AT_ONCE + (3 << 20) + 17)
        source.sendBox(result_box(payload))
        wire = drain(sent)
        step = 1 << 20
        for at in range(0, len(wire), step):
            middle.dataReceived(wire[at : at + step])
            yield task.deferLater(reactor, 0, lambda: None)
            if at == 0:
                yield until(lambda: any(sent < size for size, sent in calls.calls), what="a partial send")
                receiver.transport.resumeProducing()
        yield until(lambda: receiver.boxes or receiver.rejected, what="the box forwarded")
        self.assertIsNone(middle.rejected)
        self.assertIsNone(receiver.rejected)
        [box] = receiver.boxes
        self.assertTrue(P.decode_results(box[b"results"])[0].payload == payload)
        self.assertEqual(joined, [], "nothing of the relay joined")
        self.assertGreater(sum(size for size, _ in calls.calls), sum(sent for _, sent in calls.calls))
        self.assertEqual(out.outgoing_bytes, 0)
        self.assertIsNone(out._outgoing)

    def test_forwarded(self):
        return self.forwarded(signed=False)

    def test_forwarded_signed(self):
        return self.forwarded(signed=True)
