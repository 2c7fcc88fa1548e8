"""
L{cw.wire.forwarding}, in memory: a box forwarded as it arrives by a
middle peer (as the master) from a sender (a worker) to a receiver (a
client), each connection with its own session keys; what the receiver
gets when the box arrives whole and checked, changed, cut off or
malformed.
"""

from __future__ import annotations

import os
import struct

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from cw.test.peers import pattern
from cw.test.wire.test_session_mac import SignedPeer as Peer
from cw.test.wire.test_streaming import planned_feed
from cw.wire import commands as P
from cw.wire import forwarding
from cw.wire.auth import MAC_KEY, VOID_KEY, AuthGate, session_keys
from cw.wire.forwarding import ForwardingReceiver
from cw.wire.streaming import ChunkReceiver, SpareBuffers, StreamingSender


class Middle(StreamingSender, AuthGate, ForwardingReceiver, ChunkReceiver, amp.AMP):
    """The master's side of the sender's connection: forwards JobResults to C{destination}."""

    destination = None

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list = []
        self.voided: list[str] = []

    def relay_destination(self, command, answer, first, total):
        return self.destination if command == b"JobResults" else None

    def relay_voided(self, why):
        self.voided.append(why)

    def ampBoxReceived(self, box):
        self.boxes.append((box, self.relayed))


def connected(a, b, keys) -> StringTransport:
    """Start the session of the connection from C{a} to C{b} (in memory); C{a}'s transport."""
    transport = StringTransport()
    a.makeConnection(transport)
    b.makeConnection(StringTransport())
    if keys is not None:
        a.start_session(*keys)
        b.start_session(*reversed(keys))
    a.mark_authenticated()
    b.mark_authenticated()
    return transport


#: What a middle may forward beyond the bytes it was fed: keys, chunk
#: headers, the padding of a voided value (at most a chunk).
SLACK = 4 * P.CHUNK


def drain(transport: StringTransport, most: int = 64 << 20) -> bytes:
    """
    Everything C{transport}'s producer writes, until it has nothing more
    now; taken out.  Fails once it wrote more than C{most} bytes, so that a
    producer that never runs out (a relay that never empties: it gives
    the same bytes again) fails the test instead of hanging it.
    """
    start = len(transport.value())
    while transport.producer is not None:
        before = len(transport.value())
        transport.producer.resumeProducing()
        after = len(transport.value())
        if after == before:
            break
        if after - start > most:
            transport.clear()
            raise unittest.FailTest(
                f"the producer wrote {after - start} bytes, more than the {most} it can have had, "
                "and was still writing: it sends bytes again (Relay.peek/take/consume?)"
            )
    data = transport.value()
    transport.clear()
    return data


def forward(middle, transport: StringTransport, piece: bytes) -> bytes:
    """Feed C{piece} to C{middle}; what it forwards to C{transport} now, at most C{piece} and L{SLACK}."""
    middle.dataReceived(piece)
    return drain(transport, len(piece) + SLACK)


def result_box(payload: bytes) -> amp.AmpBox:
    box = amp.AmpBox(_command=b"JobResults")
    P.ResultBatch().toBox(b"results", box, {"results": [P.Result(1, 7, P.Outcome.OK, payload)]}, None)
    return box


class ForwardingTests(unittest.SynchronousTestCase):
    def setUp(self, signed: bool = True):
        self.patch(forwarding, "relays_to", lambda proto: True)  # a StringTransport, not TCP
        self.sender, self.middle = Peer(), Middle()
        self.out, self.receiver = Peer(), Peer()
        self.middle.destination = self.out
        worker_keys = session_keys(b"s" * 32, "worker", b"p" * 32, b"m" * 32) if signed else None
        client_keys = session_keys(b"s" * 32, "client", b"q" * 32, b"n" * 32) if signed else None
        self.sent = connected(self.sender, self.middle, worker_keys)
        self.forwarded = connected(self.out, self.receiver, client_keys)

    def wire(self, box) -> bytes:
        self.sender.sendBox(box)
        return drain(self.sent)

    def pass_on(self, wire: bytes, step: int = 50_000) -> int:
        """Feed C{wire} to the middle in pieces, passing on what it forwards; bytes forwarded early."""
        most = 0
        for at in range(0, len(wire), step):
            data = forward(self.middle, self.forwarded, wire[at : at + step])
            if at + step < len(wire):
                most += len(data)
            self.receiver.dataReceived(data)
        return most

    def test_passed_on_as_it_arrives(self):
        """
        The receiver gets the box, whole and checked; most of it went on
        before the middle had all of it; the middle dispatches it too,
        knowing it was forwarded; boxes after it go on as usual.
        """
        payload = pattern(3 << 20)
        wire = self.wire(result_box(payload))
        early = self.pass_on(wire)
        self.assertGreater(early, len(payload) * 0.9)
        self.assertIsNone(self.receiver.rejected)
        [box] = self.receiver.boxes
        self.assertEqual(P.decode_results(box[b"results"])[0].payload, payload)
        [(own, relayed)] = self.middle.boxes
        self.assertIsNotNone(relayed)
        self.assertEqual(P.decode_results(own[b"results"])[0].payload, payload)
        self.out.sendBox(amp.AmpBox(_command=b"after"))
        self.receiver.dataReceived(drain(self.forwarded))
        self.assertEqual(self.receiver.boxes[-1][b"_command"], b"after")
        self.assertEqual(self.out.outgoing_bytes, 0)

    def assert_voided(self, why: str) -> None:
        """The receiver discarded the box but reads on: a box sent after it arrives."""
        self.assertEqual(self.receiver.boxes, [])
        self.assertIsNone(self.receiver.rejected)
        self.assertEqual(len(self.middle.voided), 1)
        self.assertIn(why, self.middle.voided[0])
        self.out.sendBox(amp.AmpBox(_command=b"after"))
        self.receiver.dataReceived(drain(self.forwarded))
        self.assertEqual([box[b"_command"] for box in self.receiver.boxes], [b"after"])
        self.assertEqual(self.out.outgoing_bytes, 0)

    def lose_sender(self) -> None:
        self.middle.connectionLost(Failure(ConnectionLost()))
        self.receiver.dataReceived(drain(self.forwarded))

    def test_changed_byte_voided(self):
        """A byte changed on the way to the middle: it drops the sender, and the receiver discards the box."""
        wire = bytearray(self.wire(result_box(pattern(3 << 20))))
        wire[2 << 20] ^= 1
        self.pass_on(bytes(wire))
        self.assertIn("wrong MAC", self.middle.rejected)
        self.assertEqual(self.middle.boxes, [])
        self.lose_sender()
        self.assert_voided("wrong MAC")

    def test_cut_off_mid_chunk_voided(self):
        """The sender's connection breaks in the middle of a chunk: the receiver discards the box."""
        wire = self.wire(result_box(pattern(3 << 20)))
        self.pass_on(wire[: (2 << 20) + 1234])
        self.lose_sender()
        self.assert_voided("connection was lost")

    def test_wrong_count_voided(self):
        """A box whose chunk count is wrong (signed as it is): voided, as the middle refuses it too."""
        box = result_box(pattern(3 << 20))
        box[b"results.n"] = b"%d" % (int(box[b"results.n"]) + 1)
        self.pass_on(self.wire(box))
        self.assert_voided("wrong chunk count")

    def test_shorter_than_said_voided(self):
        """A value shorter than its size key said: voided (its one record would not decode)."""
        box = result_box(pattern(3 << 20))
        box[b"results.+"] = b"%d" % (int(box[b"results.+"]) + 10)
        self.pass_on(self.wire(box))
        self.assert_voided("were said")

    def test_receiver_gone(self):
        """The receiver's connection is lost mid-box: the middle still receives the box, and dispatches it."""
        payload = pattern(3 << 20)
        wire = self.wire(result_box(payload))
        half = len(wire) // 2
        self.pass_on(wire[:half])
        self.out.stopProducing()
        self.forwarded.unregisterProducer()
        self.middle.dataReceived(wire[half:])
        [(own, _)] = self.middle.boxes
        self.assertEqual(P.decode_results(own[b"results"])[0].payload, payload)

    def test_small_box_not_forwarded(self):
        """A box without chunks is received only; so is one whose destination declines it."""
        self.middle.dataReceived(self.wire(result_box(b"small")))
        self.middle.destination = None
        self.middle.dataReceived(self.wire(result_box(pattern(2 << 20))))
        self.assertEqual([relayed for _, relayed in self.middle.boxes], [None, None])
        self.assertEqual(drain(self.forwarded), b"")


class Rechunking(Middle):
    """Forwards an answer's payload as the one job of a RunJobs box."""

    job = P.Job(4, 2, b"", b'{"timeout":5}', b"f" * 20)

    def relay_destination(self, command, answer, first, total):
        if answer is None:
            return None
        return (self.destination, [(b"_command", b"RunJobs")], b"jobs", P.job_prefix(self.job, total))


class RechunkingTests(unittest.SynchronousTestCase):
    """An answer's payload forwarded as another box's value, after a prefix, in chunks of its own."""

    def setUp(self):
        self.patch(forwarding, "relays_to", lambda proto: True)
        self.sender, self.middle = Peer(), Rechunking()
        self.out, self.receiver = Peer(), Peer()
        self.middle.destination = self.out
        self.sent = connected(
            self.sender, self.middle, session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32)
        )
        self.forwarded = connected(
            self.out, self.receiver, session_keys(b"s" * 32, "worker", b"q" * 32, b"n" * 32)
        )

    def answer(self, payload: bytes) -> bytes:
        box = amp.AmpBox(_answer=b"1a")
        P.Blob().toBox(b"payload", box, {"payload": payload}, None)
        self.sender.sendBox(box)
        return drain(self.sent)

    def pass_on(self, wire: bytes, step: int = 50_000) -> bytes:
        """Feed C{wire} to the middle in pieces, passing on what it forwards; what it forwarded."""
        forwarded = []
        for at in range(0, len(wire), step):
            forwarded.append(forward(self.middle, self.forwarded, wire[at : at + step]))
            self.receiver.dataReceived(forwarded[-1])
        return b"".join(forwarded)

    def test_as_a_job(self):
        """The receiver gets a RunJobs box as if the job had been sent whole, with its size key."""
        for size in (P.CHUNK * 40, P.CHUNK * 40 - 7, (3 << 20) + 1):
            payload = pattern(size)
            self.receiver.boxes.clear()
            wire = self.pass_on(self.answer(payload))
            # Its length ahead of it (the receiver may assemble it in place).
            size = len(P.job_prefix(Rechunking.job, size)) + size
            self.assertIn(b"\x00\x06jobs.+" + struct.pack("!H", len(str(size))) + str(size).encode(), wire)
            self.assertIsNone(self.receiver.rejected)
            [box] = self.receiver.boxes
            self.assertEqual(box[b"_command"], b"RunJobs")
            expected = P.Job(4, 2, payload, Rechunking.job.options, Rechunking.job.func)
            self.assertEqual(P.decode_jobs(box[b"jobs"]), [P.decode_jobs(P.encode_jobs([expected]))[0]])

    def test_cut_off_voided(self):
        """The sender's connection breaks mid-value: the receiver discards the job and reads on."""
        wire = self.answer(pattern(3 << 20))
        self.pass_on(wire[: (1 << 20) + 99])
        self.middle.connectionLost(Failure(ConnectionLost()))
        self.receiver.dataReceived(drain(self.forwarded))
        self.out.sendBox(amp.AmpBox(_command=b"after"))
        self.receiver.dataReceived(drain(self.forwarded))
        self.assertIsNone(self.receiver.rejected)
        self.assertEqual([box[b"_command"] for box in self.receiver.boxes], [b"after"])


class Forgetful(Middle):
    """A middle that keeps nothing of the boxes it receives (as the master, once it forwarded one)."""

    def ampBoxReceived(self, box):
        self.boxes.append((box[b"_command"], self.relayed is not None))


class SharedSpareTests(unittest.SynchronousTestCase):
    """
    Middles sharing one L{SpareBuffers} (the master's connections): a
    value still being forwarded keeps its buffer (the relay's ranges refer
    to it), so a value arriving meanwhile on another connection is
    assembled elsewhere; once forwarded, its buffer takes later values.
    """

    def setUp(self):
        self.patch(forwarding, "relays_to", lambda proto: True)
        self.spare = SpareBuffers(Clock())
        self.pairs = []
        for name in (b"p", b"q"):
            sender, middle, out, receiver = Peer(), Forgetful(), Peer(), Peer()
            middle.spare_buffers = self.spare
            middle.destination = out
            sent = connected(sender, middle, session_keys(b"s" * 32, "worker", name * 32, b"m" * 32))
            forwarded = connected(out, receiver, session_keys(b"s" * 32, "client", name * 32, b"n" * 32))
            self.pairs.append((sender, middle, receiver, sent, forwarded))

    def arrive(self, pair: int, payload: bytes) -> None:
        """C{payload}'s box arrives whole at middle C{pair}, in reads of 50,000 bytes; none passed on."""
        sender, middle, _, sent, _ = self.pairs[pair]
        sender.sendBox(result_box(payload))
        wire = drain(sent)
        for at in range(0, len(wire), 50_000):
            middle.dataReceived(wire[at : at + 50_000])

    def delivered(self, pair: int) -> bytes:
        """Pass on what middle C{pair} holds for its receiver; the payload the receiver got."""
        _, _, receiver, _, forwarded = self.pairs[pair]
        receiver.dataReceived(drain(forwarded))
        self.assertIsNone(receiver.rejected)
        [box] = receiver.boxes
        receiver.boxes.clear()
        return P.decode_results(box[b"results"])[0].payload

    def test_read_in_place(self):
        """
        Read straight into their buffers (L{ChunkReceiver.read_plan}), values
        are forwarded whole, one still being forwarded kept as it arrived.
        """
        first, second = os.urandom(5 << 20), os.urandom(5 << 20)
        for pair, payload in ((0, first), (1, second)):
            sender, middle, _, sent, _ = self.pairs[pair]
            sender.sendBox(result_box(payload))
            self.assertGreater(planned_feed(middle, drain(sent), [100_000, 4 << 20]), 4 << 20)
        self.assertEqual(self.delivered(1), second)
        self.assertEqual(self.delivered(0), first)

    def test_value_being_forwarded_kept(self):
        first, second, third = (os.urandom(3 << 20) for _ in range(3))
        self.arrive(0, first)
        self.assertEqual(self.pairs[0][1].boxes, [(b"JobResults", True)], "forwarded, then dropped")
        self.assertGreater(self.pairs[0][1].destination.outgoing_bytes, 2 << 20, "mostly still to pass on")
        self.arrive(1, second)
        self.assertEqual(self.delivered(1), second)
        self.assertEqual(self.delivered(0), first, "left as it arrived while another value arrived")
        self.assertEqual(len(self.spare), 2)
        for payload in (third, first, second):
            self.arrive(1, payload)
            self.assertEqual(self.delivered(1), payload)
        self.assertEqual(len(self.spare), 2, "assembled in the buffers of earlier values")


class UnsignedForwardingTests(ForwardingTests):
    """The same without session keys (C{--insecure}): a voided box is discarded all the same."""

    def setUp(self):
        super().setUp(signed=False)

    def test_changed_byte_voided(self):
        """
        Without session keys nothing can tell a changed byte (what
        C{--insecure} gives up): the box is passed on whole, not voided.
        """
        wire = bytearray(self.wire(result_box(pattern(3 << 20))))
        wire[2 << 20] ^= 1
        self.pass_on(bytes(wire))
        self.receiver.dataReceived(drain(self.forwarded))
        self.assertEqual(self.middle.voided, [])
        self.assertEqual([box[b"_command"] for box in self.receiver.boxes], [b"JobResults"])


class VoidedBoxTests(unittest.SynchronousTestCase):
    """A box its sender voided is never dispatched, whatever its form."""

    def test_small_voided_box_discarded(self):
        sender, receiver = Peer(), Peer()
        transport = connected(sender, receiver, session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32))
        sender.sendBox(amp.AmpBox({b"_command": b"JobResults", VOID_KEY: b"why"}))
        sender.sendBox(amp.AmpBox(_command=b"after"))
        wire = transport.value()
        self.assertEqual(wire.count(MAC_KEY), 2)
        receiver.dataReceived(wire)
        self.assertIsNone(receiver.rejected)
        self.assertEqual([box[b"_command"] for box in receiver.boxes], [b"after"])
