"""
The framing of payloads with out-of-band buffers (L{cw.core.payload}):
layout, parsing, limits.  Pure: no pickling, no sockets.
"""

from __future__ import annotations

import array
import ctypes
import pickle
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cw.core import payload
from cw.core.payload import (
    ALIGN,
    MAGIC,
    MAX_BUFFERS,
    WRITABLE,
    Segments,
    array_from_buffer,
    frame,
    is_framed,
    memoryview_from_buffer,
    unframe,
)
from cw.core.records import (
    CHUNK,
    Job,
    Result,
    decode_jobs,
    decode_results,
    encode_jobs,
    encode_results,
    job_parts,
    lone_result,
)

buffers = st.lists(st.tuples(st.binary(max_size=300), st.booleans()), max_size=6)


def _views(items):
    """Views of C{items} (C{(bytes, writable)}): writable ones over a bytearray."""
    return [memoryview(bytearray(data)) if writable else memoryview(data) for data, writable in items]


class FrameTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(pickled=st.binary(max_size=300), items=buffers)
    def test_round_trip(self, pickled, items):
        """What L{frame} makes, L{unframe} takes apart: the pickle, each buffer, whether it was writable."""
        framed = frame(pickled, _views(items))
        data = bytes(framed)
        self.assertEqual(len(framed), len(data))
        self.assertTrue(is_framed(data))
        got_pickle, got = unframe(data)
        self.assertEqual(bytes(got_pickle), pickled)
        self.assertEqual([(bytes(view), bool(flags & WRITABLE)) for view, flags in got], items)

    @settings(max_examples=200, deadline=None)
    @given(pickled=st.binary(max_size=100), items=buffers, cut=st.integers(min_value=1, max_value=50))
    def test_truncated_or_extended_refused(self, pickled, items, cut):
        """A frame cut short, or with bytes after it, is a L{ValueError}, never a wrong answer."""
        data = bytes(frame(pickled, _views(items)))
        self.assertRaises(ValueError, unframe, data[: max(0, len(data) - cut)])
        self.assertRaises(ValueError, unframe, data + b"\0" * cut)

    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=200))
    def test_garbage_refused_or_parsed_whole(self, data):
        """Any bytes after the magic either parse into parts that add up to them, or are refused."""
        data = MAGIC + data
        try:
            got_pickle, got = unframe(data)
        except ValueError:
            return
        self.assertLessEqual(len(got_pickle) + sum(len(view) for view, _ in got), len(data))

    @settings(max_examples=100, deadline=None)
    @given(pickled=st.binary(max_size=300), items=buffers)
    def test_buffers_aligned(self, pickled, items):
        """Each buffer starts at a multiple of L{ALIGN} bytes from the payload's start."""
        data = bytearray(bytes(frame(pickled, _views(items))))
        _, got = unframe(memoryview(data))
        base = ctypes.addressof(ctypes.c_char.from_buffer(data))
        for view, _ in got:
            if len(view):
                self.assertEqual((ctypes.addressof(ctypes.c_char.from_buffer(view)) - base) % ALIGN, 0)

    def test_views_not_copies(self):
        """The parts L{unframe} gives are views of the received buffer, and writable when it is."""
        received = bytearray(bytes(frame(b"pickle", [memoryview(b"x" * 1000)])))
        got_pickle, [(view, flags)] = unframe(memoryview(received))
        self.assertFalse(view.readonly)
        view[0] = ord("y")
        self.assertIn(b"y" + b"x" * 999, bytes(received))
        self.assertIs(view.obj, received)

    def test_parts_not_joined(self):
        """L{frame} keeps the buffers as views of the originals: nothing copied."""
        big = bytearray(1 << 20)
        framed = frame(b"pickle", [memoryview(big)])
        self.assertIsInstance(framed, Segments)
        self.assertIs(framed.parts[-1].obj, big)
        self.assertEqual(len(framed), len(bytes(framed)))
        self.assertEqual(
            len(framed) - len(big) - len(b"pickle") - len(framed.parts[0]),
            -(len(framed.parts[0]) + 6) % ALIGN,
        )

    def test_plain_pickles_not_framed(self):
        """No pickle is taken for a frame, of any protocol, nor a short byte string."""
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            self.assertFalse(is_framed(pickle.dumps((1, "a", b"b"), protocol=protocol)))
        self.assertFalse(is_framed(MAGIC))
        self.assertFalse(is_framed(b""))

    def test_buffer_count_bounded(self):
        """A header declaring more than L{MAX_BUFFERS} buffers is refused before it is read."""
        data = struct.pack("!4sIQ", MAGIC, MAX_BUFFERS + 1, 0)
        with self.assertRaises(ValueError) as caught:
            unframe(data)
        self.assertIn("buffers", str(caught.exception))
        self.assertRaises(ValueError, frame, b"", [memoryview(b"")] * (MAX_BUFFERS + 1))

    def test_multidimensional_buffers_as_bytes(self):
        """A buffer of another format or shape is framed as its bytes (its length in bytes)."""
        values = array.array("d", [1.0, 2.0, 3.0])
        framed = frame(b"p", [memoryview(values)])
        self.assertEqual(framed.parts[-1].nbytes, 24)
        self.assertEqual(len(framed.parts[-1]), 24)


class LoneResultTests(unittest.TestCase):
    """L{lone_result}: where a big result goes, told by its batch's first chunk and length."""

    def test_one_result(self):
        data = encode_results([Result(3, 9, 0, b"x" * 100_000, b"out", b"err")])
        self.assertEqual(lone_result(data[:CHUNK], len(data)), (3, 9, 0))

    def test_more_results_or_too_short(self):
        data = encode_results([Result(3, 9, 0, b"x" * 100_000), Result(3, 10, 0, b"y")])
        self.assertIsNone(lone_result(data[:CHUNK], len(data)))
        self.assertIsNone(lone_result(data[:10], len(data)))
        one = encode_results([Result(3, 9, 0, b"x" * 100_000)])
        self.assertIsNone(lone_result(one[:CHUNK], len(one) - 1))


class SegmentsInRecordsTests(unittest.TestCase):
    """A L{Segments} payload is written part by part into job and result batches, and reads back whole."""

    def test_job_batch(self):
        framed = frame(b"pickle", [memoryview(b"a" * 100_000), memoryview(bytearray(b"b" * 70_000))])
        jobs = [Job(0, 1, b"small"), Job(0, 2, framed, b'{"x":1}', b"key"), Job(0, 3, b"")]
        parts = job_parts(jobs)
        # The buffers themselves are among the parts, not copies of them.
        self.assertTrue(any(part is framed.parts[-1] for part in parts))
        decoded = decode_jobs(encode_jobs(jobs))
        self.assertEqual(bytes(decoded[1].payload), bytes(framed))
        self.assertEqual([bytes(job.payload) for job in (decoded[0], decoded[2])], [b"small", b""])

    def test_result_batch(self):
        framed = frame(b"pickle", [memoryview(b"c" * 100_000)])
        results = [Result(0, 1, 0, framed, b"out"), Result(0, 2, 0, b"x")]
        decoded = decode_results(encode_results(results))
        self.assertEqual(bytes(decoded[0].payload), bytes(framed))
        self.assertEqual(decoded[0].stdout, b"out")


class LoaderTests(unittest.TestCase):
    """The reconstructors that pickles name by reference."""

    def test_array(self):
        self.assertEqual(
            array_from_buffer("i", array.array("i", [1, 2, 3]).tobytes()), array.array("i", [1, 2, 3])
        )

    def test_memoryview_shape(self):
        data = bytearray(array.array("d", range(6)).tobytes())
        view = memoryview_from_buffer(memoryview(data), "d", (2, 3))
        self.assertEqual(view.tolist(), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
        self.assertIs(view.obj, data)

    def test_threshold_positive(self):
        self.assertGreater(payload.OUT_OF_BAND_ABOVE, 0)


class ResultReferenceTests(unittest.TestCase):
    """L{payload.result_reference}: where a lent result lies, told apart from any other payload."""

    def test_round_trip(self):
        where = payload.ResultReference(4321, 17, 1 << 40, 128, 50_000_000, 3)
        self.assertEqual(payload.read_result_reference(payload.result_reference(where)), where)
        self.assertEqual(payload.read_result_reference(memoryview(payload.result_reference(where))), where)

    def test_other_payloads(self):
        """Pickles, frames and error reports are not references, even of the reference's length."""
        size = payload.RESULT_REFERENCE_SIZE
        for other in (
            pickle.dumps(b"x" * size, protocol=5),
            bytes(frame(b"pickle", [memoryview(b"c" * 100_000)])),
            b'{"type": "Error"}',
            pickle.dumps(b"x" * 20)[:size].ljust(size, b"x"),
            payload.MAGIC + bytes(size - len(payload.MAGIC)),
        ):
            self.assertIsNone(payload.read_result_reference(other))


class ArgumentReferenceTests(unittest.TestCase):
    """References to an argument left in its client's memory (L{payload.reference})."""

    def test_round_trip(self):
        ref = payload.reference(4_000_000, 17, 1 << 40, 50_000_000)
        self.assertEqual(len(ref), payload.REFERENCE_SIZE)
        self.assertEqual(payload.read_reference(ref), (4_000_000, 17, 1 << 40, 50_000_000))
        self.assertEqual(payload.read_reference(memoryview(ref)), (4_000_000, 17, 1 << 40, 50_000_000))

    def test_other_payloads_are_not_references(self):
        """Pickles (of the same length too), framed payloads and result references are not."""
        same_length = pickle.dumps(b"x" * 10)[: payload.REFERENCE_SIZE].ljust(payload.REFERENCE_SIZE, b".")
        framed = bytes(frame(b"p", [memoryview(b"y" * 100)]))
        for other in (b"", pickle.dumps(42), same_length, framed[: payload.REFERENCE_SIZE]):
            self.assertIsNone(payload.read_reference(other), other)
            self.assertEqual(payload.payload_size(other), len(other))

    def test_size_is_what_it_stands_for(self):
        """Flow control and the payload limit count the bytes a reference stands for."""
        self.assertEqual(payload.payload_size(payload.reference(1, 2, 3, 123_456_789)), 123_456_789)
        self.assertEqual(payload.payload_size(b"z" * 1000), 1000)
