"""
Payloads pickled with their big buffers out of band (L{cw.wire.pickling}):
every kind of buffer round-trips, big ones are not copied into the pickle
nor out of the received bytes, small payloads stay plain pickles, and
arrays load writable.  In this process: no sockets.
"""

from __future__ import annotations

import array
import pickle
import tracemalloc

from twisted.trial import unittest

from cw import system
from cw.core.payload import OUT_OF_BAND_ABOVE, Segments, is_framed
from cw.wire import pickling

try:
    import numpy
except ImportError:  # NumPy is in the test extra; without it, its tests skip
    numpy = None

BIG = 4 << 20


def received(payload) -> memoryview:
    """C{payload} as a receiver holds it: one writable buffer (L{cw.wire.streaming.ChunkReceiver})."""
    return memoryview(bytearray(bytes(payload)))


def apart(data: Segments) -> int:
    """How many buffers travel beside the pickle in C{data} (not counting padding)."""
    return sum(1 for part in data.parts[2:] if len(part) >= OUT_OF_BAND_ABOVE)


def needs_numpy(test):
    if numpy is None:
        test.skip = "NumPy is not installed"
    return test


class RoundTripTests(unittest.TestCase):
    def test_small_stays_plain(self):
        """A payload with no big buffer is a plain pickle, loaded as before."""
        value = (len, (b"x" * 100, bytearray(100), array.array("i", [1, 2])), {"k": "v"})
        data = pickling.dumps(pickling.call_value(*value))
        self.assertIsInstance(data, bytes)
        self.assertFalse(is_framed(data))
        self.assertEqual(pickling.loads(data), value)
        self.assertEqual(pickle.loads(data), value)

    def test_every_kind(self):
        """bytes, bytearray, memoryview and array.array over the threshold travel apart, come back equal."""
        size = OUT_OF_BAND_ABOVE + 7
        blob = bytes(range(256)) * (size // 256)
        doubles = array.array("d", range(size // 8))
        args = (blob, bytearray(blob), memoryview(bytearray(blob)), doubles, memoryview(doubles))
        data = pickling.dumps(pickling.call_value(len, args, {"key": blob}))
        self.assertIsInstance(data, Segments)
        self.assertEqual(apart(data), 6)
        func, got, kwargs = pickling.loads(received(data))
        self.assertIs(func, len)
        self.assertEqual([type(a) for a in got], [bytes, bytearray, memoryview, array.array, memoryview])
        self.assertEqual(got[0], blob)
        self.assertEqual(got[1], bytearray(blob))
        self.assertEqual(bytes(got[2]), blob)
        self.assertEqual(got[3], doubles)
        self.assertEqual(
            (got[4].format, got[4].shape, got[4].tolist()), ("d", (len(doubles),), doubles.tolist())
        )
        self.assertEqual(kwargs, {"key": blob})

    def test_bytes_in_short_containers(self):
        """Big bytes in a short tuple or list (argument or result) travel apart; deeper, in the pickle."""
        blob = b"z" * OUT_OF_BAND_ABOVE
        value = pickling.out_of_band((1, blob, [blob]))
        data = pickling.dumps(value)
        self.assertEqual(apart(data), 1)
        self.assertEqual(pickling.loads(received(data)), (1, blob, [blob]))
        _, args, kwargs = pickling.loads(
            received(pickling.dumps(pickling.call_value(len, ([blob],), {"k": (blob,)})))
        )
        self.assertEqual((args, kwargs), (([blob],), {"k": (blob,)}))
        long = [blob] * (pickling.LOOK_INTO + 1)
        self.assertIs(pickling.out_of_band(long), long)

    def test_multidimensional_memoryview(self):
        """A memoryview keeps its format and shape."""
        view = memoryview(bytearray(array.array("i", range(OUT_OF_BAND_ABOVE)).tobytes())).cast(
            "i", (256, OUT_OF_BAND_ABOVE // 256)
        )
        got = pickling.loads(received(pickling.dumps(view)))
        self.assertEqual((got.format, got.shape), ("i", view.shape))
        self.assertEqual(got.tolist(), view.tolist())

    def test_read_only_arrival_copied_when_writable_source(self):
        """
        A writable buffer that arrives read-only (as C{bytes}) is copied into
        a writable one; a read-only one is left as it is.
        """
        data = bytes(pickling.dumps((memoryview(bytearray(BIG)), memoryview(bytes(BIG)))))
        writable, readonly = pickling.loads(data)
        self.assertFalse(writable.readonly)
        self.assertTrue(readonly.readonly)

    def test_malformed_frame_refused(self):
        data = bytes(pickling.dumps(pickling.out_of_band(bytearray(BIG))))
        self.assertRaises(ValueError, pickling.loads, data[:-1])


class PlainTests(unittest.TestCase):
    """
    Values of scalars only (a lone job's arguments and result, typically)
    are pickled by the standard pickler, which writes them as cloudpickle
    would, without cloudpickle's set-up (issue 18, item 4); anything else
    still goes through cloudpickle.
    """

    PLAIN = [
        5,
        ((1,), {}),
        ((1.5, "text", None, True, 2j, b"small"), {"key": -3}),
        ((1, (2, 3), [4, 5]), {"k": {"a": 1}}),
    ]

    def test_plain_values_by_the_standard_pickler(self):
        for value in self.PLAIN:
            data = pickling.dumps(value)
            self.assertEqual(data, pickle.dumps(value, pickling.PROTOCOL))
            self.assertEqual(pickling.loads(data), value)

    def test_others_by_cloudpickle(self):
        """Functions, other types, deep or long containers and big bytes are not taken for plain."""
        local = 7
        for value in [
            ((lambda: local,), {}),
            ((len,), {}),
            ((bytearray(3),), {}),
            ((1, [[2]]), {}),
            (tuple(range(pickling.LOOK_INTO + 1)), {}),
            ({(1, 2): 3},),
            ((b"x" * OUT_OF_BAND_ABOVE,), {}),
            ((1,), {"k": array.array("i", [1])}),
            (type("Int", (int,), {})(3),),
        ]:
            self.assertFalse(pickling._plain(value), value)
        fn = pickling.loads(pickling.dumps(((lambda: local,), {})))[0][0]
        self.assertEqual(fn(), 7)


class BigBytesTests(unittest.TestCase):
    """
    Big C{bytes} and C{bytearray} sent out of band load through
    L{cw.system.copied} (their pages mapped in bulk), as their own type.
    """

    def test_loaded_by_copied(self):
        made = []

        def counting(buffer, kind=bytes):
            made.append(kind)
            return system.copied(buffer, kind)

        self.patch(pickling, "copied", counting)
        big, mutable = b"\x02" * BIG, bytearray(b"\x03" * BIG)
        got = pickling.loads(received(pickling.dumps(pickling.call_value(len, (big, mutable), {}))))
        self.assertEqual(made, [bytes, bytearray])
        self.assertEqual(got, (len, (big, mutable), {}))
        self.assertIs(type(got[1][0]), bytes)
        self.assertIs(type(got[1][1]), bytearray)


class NotCopiedTests(unittest.TestCase):
    """Big buffers are neither copied into the pickle nor out of the received bytes."""

    def peak_while(self, func):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            value = func()
            return value, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def test_dumps_does_not_copy_bytes(self):
        """Pickling a call with a 64 MiB bytes argument allocates a small fraction of it (before: all)."""
        blob = b"\x01" * (64 << 20)
        data, peak = self.peak_while(lambda: pickling.dumps(pickling.call_value(len, (blob,), {})))
        self.assertLess(peak, 1 << 20)
        self.assertEqual(len(data.parts[-1]), len(blob))

    @needs_numpy
    def test_numpy_not_copied_either_way(self):
        """
        A 64 MiB array is pickled without a copy, and loads as a writable
        view of the received buffer (no copy), its content intact.
        """
        a = numpy.arange(8 << 20, dtype="f8")
        data, peak = self.peak_while(lambda: pickling.dumps(pickling.call_value(sum, (a,), {})))
        self.assertLess(peak, 1 << 20)
        self.assertTrue(numpy.shares_memory(numpy.frombuffer(data.parts[-1], "f8"), a))
        buffer = received(data)
        (_, (got,), _), peak = self.peak_while(lambda: pickling.loads(buffer))
        self.assertLess(peak, 1 << 20)
        self.assertTrue(numpy.shares_memory(got, numpy.frombuffer(buffer, "u1")))
        self.assertTrue(got.flags.writeable)
        self.assertTrue(numpy.array_equal(got, a))

    @needs_numpy
    def test_numpy_kinds(self):
        """Fortran order, structured dtypes, views and a small array all round-trip."""
        values = [
            numpy.asfortranarray(numpy.arange(40_000, dtype="i8").reshape(200, 200)),
            numpy.zeros(50_000, dtype=[("x", "f4"), ("y", "i2")]),
            numpy.arange(100_000)[::2],  # not contiguous: pickled in band
            numpy.arange(10),
        ]
        got = pickling.loads(received(pickling.dumps(values)))
        for want, have in zip(values, got, strict=True):
            self.assertEqual(want.dtype, have.dtype)
            self.assertTrue(numpy.array_equal(want, have))
            self.assertTrue(have.flags.writeable)
        self.assertTrue(got[0].flags.f_contiguous)
