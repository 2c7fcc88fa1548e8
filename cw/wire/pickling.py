"""
Pickling payloads with their big buffers out of band (pickle protocol 5).

L{dumps} pickles a job's call or a job's result with cloudpickle; every
buffer of at least L{OUT_OF_BAND_ABOVE} bytes (a NumPy array, a
C{memoryview}, an C{array.array}, and C{bytes} or C{bytearray} passed
as an argument or returned, or in a short tuple or list that is: see
L{out_of_band}; deeper, these two are written into the pickle by the
pickler itself) is left out of the pickle
and travels beside it, in a L{cw.core.payload} frame whose parts are views
of the buffers where they lie: nothing is copied on the sending side.
L{loads} takes a received payload (a plain pickle or a frame) and loads it
with the buffers as views of the received bytes, so a NumPy array is not
copied out either.  C{bytes}, C{bytearray} and C{array.array} own their
memory, so loading one copies it once (as loading it from a pickle does).

Arrays come back writable, as from C{ProcessPoolExecutor}: the receiving
sides assemble a payload in a writable buffer
(L{cw.wire.streaming.ChunkReceiver}); a buffer that was writable where it
was pickled but arrives read-only (a short payload, received as C{bytes})
is copied into a writable one.

The client pickles with L{dumps} and loads results with L{loads}; the job
process does the reverse.  The master and worker never unpickle: to them a
payload stays opaque bytes.

Layer rule (cw.wire): imports Twisted, ampoule, cloudpickle, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import array
import io
import pickle
from collections import ChainMap
from typing import Any

import cloudpickle

from cw.core.payload import (
    MAX_BUFFERS,
    OUT_OF_BAND_ABOVE,
    WRITABLE,
    Segments,
    array_from_buffer,
    frame,
    is_framed,
    memoryview_from_buffer,
    unframe,
)
from cw.system import copied

#: The pickle protocol of payloads: 5, the first with out-of-band buffers.
PROTOCOL = 5


class OutOfBand:
    """
    Stands for a C{bytes} or C{bytearray} value while it is pickled, so
    that it travels out of band: the pickler writes those two types itself,
    without asking how to reduce them.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int):
        # Read-only: the loader copies it into a new bytes or bytearray anyway.
        return _COPIERS[type(self.data)], (pickle.PickleBuffer(memoryview(self.data).toreadonly()),)


def bytes_from_buffer(buffer) -> bytes:
    """
    Load a big C{bytes} that travelled out of band: a copy of C{buffer}
    made as C{bytes(buffer)} makes it, but with the pages mapped in bulk
    (L{cw.system.copied}), which matters most for the first touch of
    fresh memory.
    """
    return copied(buffer, bytes)


def bytearray_from_buffer(buffer) -> bytearray:
    """As L{bytes_from_buffer}, a C{bytearray}."""
    return copied(buffer, bytearray)


_COPIERS = {bytes: bytes_from_buffer, bytearray: bytearray_from_buffer}


#: Tuples and lists up to this long are looked into for big C{bytes} (see L{out_of_band}).
LOOK_INTO = 16


def _big_bytes(value: Any) -> bool:
    kind = type(value)
    return (kind is bytes or kind is bytearray) and len(value) >= OUT_OF_BAND_ABOVE


def _any_big_bytes(values) -> bool:
    """True if C{values} (an iterable) holds big C{bytes}, directly or in a short tuple or list."""
    for value in values:
        kind = type(value)
        if kind is bytes or kind is bytearray:
            if len(value) >= OUT_OF_BAND_ABOVE:
                return True
        elif (kind is tuple or kind is list) and len(value) <= LOOK_INTO:
            for item in value:
                if type(item) in _BYTES and len(item) >= OUT_OF_BAND_ABOVE:
                    return True
    return False


_BYTES = (bytes, bytearray)


def out_of_band(value: Any) -> Any:
    """
    C{value} with big C{bytes} and C{bytearray} marked to travel out of
    band (L{OutOfBand}): C{value} itself, or the items of a tuple or list
    of at most L{LOOK_INTO} items.  Elsewhere they travel in the pickle.
    """
    if _big_bytes(value):
        return OutOfBand(value)
    kind = type(value)
    if (kind is tuple or kind is list) and len(value) <= LOOK_INTO and any(_big_bytes(v) for v in value):
        return kind(OutOfBand(v) if _big_bytes(v) else v for v in value)
    return value


def call_value(func: Any, args: tuple, kwargs: dict) -> tuple:
    """
    C{(func, args, kwargs)} to pickle, big C{bytes} and C{bytearray} among
    its arguments marked to travel out of band (L{out_of_band} of each
    argument; cheap when there are none: the common case).
    """
    args, kwargs = arguments_value(args, kwargs)
    return func, args, kwargs


def arguments_value(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """C{(args, kwargs)} to pickle, their big C{bytes} and C{bytearray} marked as in L{call_value}."""
    if _any_big_bytes(args):
        args = tuple(out_of_band(a) for a in args)
    if kwargs and _any_big_bytes(kwargs.values()):
        kwargs = {k: out_of_band(v) for k, v in kwargs.items()}
    return args, kwargs


def _reduce_array(values: array.array):
    """An C{array.array} over the threshold travels as its bytes, out of band."""
    if values.itemsize * len(values) < OUT_OF_BAND_ABOVE:
        return values.__reduce_ex__(PROTOCOL)
    return array_from_buffer, (values.typecode, pickle.PickleBuffer(memoryview(values).toreadonly()))


def _reduce_memoryview(view: memoryview):
    """A memoryview travels as its bytes, format and shape; loaded, it is a view of the received buffer."""
    if not view.c_contiguous:
        view = memoryview(view.tobytes()).cast("B").cast(view.format, view.shape)
    try:
        memoryview_from_buffer(view, view.format, view.shape)
    except (TypeError, ValueError) as e:
        raise pickle.PicklingError(f"cannot pickle a memoryview of format {view.format!r}: {e}") from None
    return memoryview_from_buffer, (pickle.PickleBuffer(view), view.format, view.shape)


class Pickler(cloudpickle.Pickler):
    """
    cloudpickle's pickler, with C{memoryview} and C{array.array} reduced to
    buffers.  Through its C{dispatch_table}, not C{reducer_override}, which
    the pickler calls for every object (small jobs would pay for it).
    """

    # One level, as cloudpickle's own: the pickler looks up every object's type here.
    dispatch_table = ChainMap(
        {memoryview: _reduce_memoryview, array.array: _reduce_array}, *cloudpickle.Pickler.dispatch_table.maps
    )


#: Types that the standard pickler writes as cloudpickle would (no
#: reference to code, no buffer to leave out of band): see L{_plain}.
_SCALARS = frozenset({int, float, complex, str, bool, type(None)})


def _plain(value: Any, depth: int = 2) -> bool:
    """
    Whether C{value} is made only of scalars (L{_SCALARS}) and C{bytes}
    under L{OUT_OF_BAND_ABOVE}, directly or in tuples, lists and dicts at
    most C{depth} deep and L{LOOK_INTO} long: what C{pickle.dumps} writes
    exactly as cloudpickle would, in a microsecond rather than the tens
    that setting up cloudpickle's pickler costs a lone job (issue 18).
    """
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is bytes:
        return len(value) < OUT_OF_BAND_ABOVE
    if kind is not tuple and kind is not list and kind is not dict:
        return False
    if not depth or len(value) > LOOK_INTO:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) not in _SCALARS or not _plain(item, depth - 1):
                return False
        return True
    for item in value:
        if not _plain(item, depth - 1):
            return False
    return True


def dumps(value: Any) -> bytes | Segments:
    """
    C{value} pickled with cloudpickle: plain bytes, or, if it holds
    buffers of at least L{OUT_OF_BAND_ABOVE} bytes, a L{Segments} whose
    parts are the pickle and views of those buffers (see the module docstring).
    A value of scalars only (L{_plain}) is pickled by the standard pickler.
    """
    if _plain(value):
        return pickle.dumps(value, PROTOCOL)
    buffers: list[memoryview] = []

    def apart(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < OUT_OF_BAND_ABOVE or len(buffers) >= MAX_BUFFERS:
            return True  # in the pickle
        buffers.append(raw)
        return False

    with io.BytesIO() as file:
        Pickler(file, protocol=PROTOCOL, buffer_callback=apart).dump(value)
        pickled = file.getvalue()
    if not buffers:
        return pickled
    return frame(pickled, buffers)


def loads(data: Any) -> Any:
    """
    Undo L{dumps}: C{data} is the received payload (C{bytes} or a view);
    out-of-band buffers are views of it, copied only where a writable one
    arrived read-only.
    """
    if not is_framed(data):
        return pickle.loads(data)
    pickled, segments = unframe(data)
    buffers = [
        memoryview(copied(view, bytearray)) if flags & WRITABLE and view.readonly else view
        for view, flags in segments
    ]
    return pickle.loads(pickled, buffers=buffers)
