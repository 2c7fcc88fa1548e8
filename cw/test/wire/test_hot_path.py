"""
The fast paths of a lone job's boxes (issue 18, lone round trip) against
AMP's own: a signed box's wire bytes (L{cw.wire.auth.box_body}), its MAC
checked in one step (L{cw.wire.auth.BoxMac.check_small}, a tampered box
still refused), the keys and values sliced from a read
(L{cw.wire.streaming.ChunkReceiver}), the hot commands' arguments read
without AMP's parser (L{cw.wire.checked.parse_plain}) and their records
from bytes (L{cw.core.records}): the same boxes, values and errors as
the general path.
"""

from __future__ import annotations

import os

from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial import unittest

from cw.core import records
from cw.core.payload import Segments
from cw.test.wire.test_session_mac import SignedPeer
from cw.wire import auth
from cw.wire import commands as P
from cw.wire.auth import BoxMac, box_body, session_keys
from cw.wire.checked import fill_plain, parse_arguments, parse_plain, parse_response

KEYS = session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32)

JOBS = [P.Job(3, 17, b"\x80\x05" + b"x" * 40, b"", b"k" * 20), P.Job(3, 18, b"y" * 100, b'{"a":1}', b"fn")]
RESULTS = [
    P.Result(3, 17, P.Outcome.OK, b"\x80\x05K\x01.", b"out", b""),
    P.Result(3, 18, P.Outcome.RAISED, b"{}"),
]


def hot_boxes() -> list[amp.AmpBox]:
    """Boxes of the hot commands as their senders make them, with AMP's own keys."""
    boxes = []
    for command, arguments in (
        (P.SubmitJobs, {"jobs": JOBS}),
        (P.RunJobs, {"jobs": JOBS}),
        (P.JobResults, {"results": RESULTS}),
        (P.RunBatch, {"jobs": JOBS, "contexts": {}, "functions": {}, "shared": None}),
        (
            P.RunBatch,
            {
                "jobs": JOBS,
                "contexts": {"3": {"cwd": "/"}},
                "functions": {(3, b"k"): b"f"},
                "shared": {"pid": 1},
            },
        ),
    ):
        box = command.makeArguments(arguments, None)
        box[amp.COMMAND] = command.commandName
        if command.requiresAnswer:
            box[amp.ASK] = b"1f"
        boxes.append(box)
    return boxes


class BoxBodyTests(unittest.SynchronousTestCase):
    """L{box_body} writes what AMP writes (without the end), and refuses what AMP refuses."""

    def test_same_bytes_as_amp(self):
        boxes = hot_boxes() + [
            amp.AmpBox(),
            amp.AmpBox({b"k" * 255: b"v" * amp.MAX_VALUE_LENGTH, b"a": b""}),
            amp.AmpBox({b"z": b"1", b"b": memoryview(b"view"), b"_answer": b"2"}),
        ]
        for box in boxes:
            self.assertEqual(bytes(box_body(box)), box.serialize()[:-2], box)

    def test_refuses_as_amp(self):
        for box, error in (
            (amp.AmpBox({b"k": b"v" * (amp.MAX_VALUE_LENGTH + 1)}), amp.TooLong),
            (amp.AmpBox({b"k" * 256: b"v"}), amp.TooLong),
            ({b"k": "text"}, TypeError),
            ({"key": b"v"}, TypeError),
        ):
            self.assertRaises(error, amp.AmpBox.serialize, box)
            self.assertRaises(error, box_body, box)


class CheckSmallTests(unittest.SynchronousTestCase):
    """L{BoxMac.check_small} accepts exactly what L{BoxMac.check} accepts, for small boxes."""

    def check(self, receiver: BoxMac, data: bytes, value) -> str | None:
        mac = receiver.start()
        mac.update(data)
        return receiver.check(mac, value)

    def test_agrees_with_check(self):
        data = os.urandom(300)
        sender = BoxMac(KEYS[0])
        sender.sequence = 5
        signed = sender.sign(data)
        value = signed[len(data) + len(auth._MAC_HEAD) : -2]
        variants = [(data, value), (data, None), (data, value[:-1]), (data, value + b"\0")]
        for at in range(0, len(data), 7):
            changed = bytearray(data)
            changed[at] ^= 1
            variants.append((bytes(changed), value))
        for at in range(len(value)):
            changed = bytearray(value)
            changed[at] ^= 1 << (at % 8)
            variants.append((data, bytes(changed)))
        for data_, value_ in variants:
            for due in (4, 5, 6):
                fast, slow = BoxMac(KEYS[0]), BoxMac(KEYS[0])
                fast.sequence = slow.sequence = due
                good = fast.check_small(memoryview(data_), value_)
                self.assertEqual(good, self.check(slow, data_, value_) is None)
                self.assertEqual(fast.sequence, slow.sequence)
                self.assertEqual(good, data_ == data and value_ == value and due == 5)

    def test_big_box_left_to_check(self):
        data = os.urandom(auth.SMALL_BOX + 1)
        signed = BoxMac(KEYS[0]).sign(data)
        value = signed[len(data) + len(auth._MAC_HEAD) : -2]
        receiver = BoxMac(KEYS[0])
        self.assertFalse(receiver.check_small(data, value))
        self.assertEqual(receiver.sequence, 0)
        self.assertIsNone(self.check(receiver, data, value))


def first_box_length() -> int:
    """Bytes of the first of L{hot_boxes}, signed."""
    return len(box_body(hot_boxes()[0])) + len(auth._MAC_HEAD) + auth.MAC_BYTES + 2


class WholeBoxTests(unittest.SynchronousTestCase):
    """A signed box that arrives whole in one read takes the fast path, and a changed one is refused there."""

    def setUp(self):
        self.sender, self.receiver = SignedPeer(), SignedPeer()
        self.transport = StringTransport()
        self.sender.makeConnection(self.transport)
        self.receiver.makeConnection(StringTransport())
        self.sender.start_session(*KEYS)
        self.receiver.start_session(*reversed(KEYS))
        self.receiver.mark_authenticated()
        self.whole = []
        receive = self.receiver.whole_box

        def whole_box(box, wire, last):
            taken = receive(box, wire, last)
            self.whole.append(taken)
            return taken

        self.receiver.whole_box = whole_box

    def wire(self) -> bytes:
        for box in hot_boxes():
            self.sender.sendBox(box)
        return self.transport.value()

    def test_boxes_arrive(self):
        self.receiver.dataReceived(self.wire())
        self.assertEqual(self.receiver.boxes, hot_boxes())
        self.assertEqual({type(k) for box in self.receiver.boxes for k in box.values()}, {bytes})
        self.assertEqual(self.whole, [True] * len(hot_boxes()))
        self.assertIsNone(self.receiver.rejected)

    def test_changed_byte_refused(self):
        wire = self.wire()
        first = first_box_length()
        for at in (3, first // 2, first - 20, first - 3, first + 5):
            receiver = SignedPeer()
            receiver.makeConnection(StringTransport())
            receiver.start_session(*reversed(KEYS))
            receiver.mark_authenticated()
            changed = bytearray(wire)
            changed[at] ^= 0x10
            receiver.dataReceived(bytes(changed))
            self.assertEqual(receiver.boxes, hot_boxes()[:1] if at >= first else [], at)
            self.assertIn("MAC", receiver.rejected, at)
            self.assertTrue(receiver.transport.disconnecting, at)

    def test_replayed_box_refused(self):
        first = self.wire()[: first_box_length()]
        self.receiver.dataReceived(first)
        self.receiver.dataReceived(first)
        self.assertEqual(len(self.receiver.boxes), 1)
        self.assertIn("out of sequence", self.receiver.rejected)


class ParsePlainTests(unittest.SynchronousTestCase):
    """L{parse_plain} reads the hot commands' boxes as AMP does, and leaves the rest to AMP."""

    def test_same_as_amp(self):
        for box in hot_boxes():
            command = P.RunBatch if box[amp.COMMAND] == b"RunBatch" else getattr(P, box[amp.COMMAND].decode())
            self.assertIsNotNone(parse_plain(command, "arguments", box))
            self.assertEqual(parse_arguments(command, box, None), command.parseArguments(box, None))
        for response in ({"results": RESULTS}, {"results": RESULTS, "shared": {"size": 3}}):
            answer = P.RunBatch.makeResponse(response, None)
            answer[amp.ANSWER] = b"1f"
            self.assertIsNotNone(parse_plain(P.RunBatch, "response", answer))
            self.assertEqual(parse_response(answer, P.RunBatch, None), P.RunBatch.parseResponse(answer, None))

    def test_chunked_and_other_boxes_left_to_amp(self):
        big = P.RunJobs.makeArguments({"jobs": [P.Job(1, 1, b"z" * (3 * P.CHUNK))]}, None)
        extra = P.RunJobs.makeArguments({"jobs": JOBS}, None)
        extra[b"other"] = b"1"
        missing = amp.AmpBox({amp.COMMAND: b"RunJobs"})
        for box in (big, extra, missing):
            self.assertIsNone(parse_plain(P.RunJobs, "arguments", box))
        self.assertEqual(parse_arguments(P.RunJobs, big, None), P.RunJobs.parseArguments(big, None))
        self.assertEqual(parse_arguments(P.RunJobs, extra, None), P.RunJobs.parseArguments(extra, None))
        self.assertRaises(KeyError, parse_arguments, P.RunJobs, missing, None)
        # Commands with arguments of other kinds are AMP's.
        self.assertIsNone(parse_plain(P.JobRoom, "arguments", amp.AmpBox(bytes=b"1", jobs=b"2")))

    def test_malformed_raises_as_amp(self):
        for value in (b"\0" * 5, records.encode_jobs(JOBS)[:-1]):
            box = amp.AmpBox(jobs=value)
            with self.assertRaises(ValueError) as amp_way:
                P.RunJobs.parseArguments(box, None)
            with self.assertRaises(ValueError) as fast_way:
                parse_arguments(P.RunJobs, box, None)
            self.assertEqual(str(fast_way.exception), str(amp_way.exception))


class RecordsFromBytesTests(unittest.SynchronousTestCase):
    """
    Records decoded from C{bytes} (sliced) equal those from a view or a
    bytearray (copied), big payloads as views.
    """

    def test_same_records(self):
        big = P.Job(1, 2, b"b" * records.VIEW_THRESHOLD)
        for decode, encode, items in (
            (records.decode_jobs, records.encode_jobs, JOBS + [big]),
            (records.decode_results, records.encode_results, RESULTS),
        ):
            data = encode(items)
            for given in (data, memoryview(data), bytearray(data)):
                decoded = decode(given)
                self.assertEqual(decoded, items)
                for item in decoded:
                    expected = memoryview if len(item.payload) >= records.VIEW_THRESHOLD else bytes
                    self.assertIs(type(item.payload), expected)


class FillPlainTests(unittest.SynchronousTestCase):
    """L{fill_plain} makes the boxes AMP's C{toBox} makes for the hot commands, and refuses alike."""

    def made(self, command, which: str, values: dict) -> amp.AmpBox:
        box = amp.AmpBox()
        self.assertTrue(fill_plain(command, which, values, box))
        return box

    def test_same_boxes_as_amp(self):
        big = P.Job(1, 1, b"z" * (3 * P.CHUNK + 5), b"", b"fn")
        segments = P.Job(1, 2, Segments([b"a" * P.CHUNK, b"b" * 10]))
        for command, arguments in (
            (P.SubmitJobs, {"jobs": JOBS}),
            (P.RunJobs, {"jobs": JOBS + [big, segments]}),
            (P.JobResults, {"results": RESULTS}),
            (P.RunBatch, {"jobs": JOBS, "contexts": {}, "functions": {}}),
            (P.RunBatch, {"jobs": JOBS, "contexts": {"1": {"cwd": "/" + "d" * P.CHUNK}}, "functions": {}}),
            (
                P.RunBatch,
                {
                    "jobs": [big],
                    "contexts": {"1": {"cwd": "/"}},
                    "functions": {(1, b"fn"): b"f"},
                    "shared": {"pid": 1},
                },
            ),
            (P.DefineFunction, {"client": 1, "key": b"k", "function": b"f"}),  # not plain: AMP's
        ):
            box = amp.AmpBox()
            if fill_plain(command, "arguments", arguments, box):
                self.assertEqual(box, command.makeArguments(arguments, None), command)
            else:
                self.assertIs(command, P.DefineFunction)
                self.assertEqual(box, {})
        for response in ({"results": RESULTS}, {"results": RESULTS, "shared": {"size": 3}}):
            self.assertEqual(
                self.made(P.RunBatch, "response", response), P.RunBatch.makeResponse(response, None)
            )

    def test_refuses_as_amp(self):
        bad = {"jobs": [P.Job(1, 1, b"x", b"o" * 70_000)]}
        with self.assertRaises(ValueError) as amp_way:
            P.RunJobs.makeArguments(bad, None)
        with self.assertRaises(ValueError) as fast_way:
            fill_plain(P.RunJobs, "arguments", bad, amp.AmpBox())
        self.assertEqual(str(fast_way.exception), str(amp_way.exception))
