"""
The framing of payloads that carry big buffers out of band: pure (no
pickling, no I/O).

A payload (a job's arguments, a job's result) is a pickle.  With pickle
protocol 5, big buffers (NumPy arrays, C{bytearray}, C{bytes},
C{memoryview}, C{array.array}) need not be copied into the pickle: the
pickler hands them out (its C{buffer_callback}) and the loader takes them
back (its C{buffers=}); L{cw.wire.pickling} does that.  Such a payload
travels as one byte string laid out as::

    MAGIC  count (u32)  pickle length (u64)     the header, L{_HEAD}
    count x (length (u64), flags (u8))          one entry per buffer, L{_SEGMENT}
    the pickle
    the buffers, in order, each after zero bytes that put it at a
    multiple of L{ALIGN} bytes from the payload's start

all integers big-endian.  The padding keeps arrays aligned wherever the
payload itself starts aligned (as in its own allocation or mapping).  The
sender never joins it: a L{Segments} is the list of its parts (the
header, the pickle, and views of the buffers where they lie), which the
wire writes one after the other (see
L{cw.core.records.job_parts}).  The receiver gets it in one buffer and
L{unframe} cuts views of that buffer, so the loader copies nothing.

A plain pickle (no buffer big enough to travel apart: the common case of
small jobs) is sent as it is; L{MAGIC} begins with a zero byte, which no
pickle does, so L{is_framed} tells the two apart.  The master never looks
inside: to it a framed payload is opaque bytes like any other, its length
(L{Segments.__len__}: every part) counted against its limits.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import array
import struct
from typing import Any, NamedTuple

#: The first bytes of a framed payload (no pickle begins with a zero byte).
MAGIC = b"\x00cw\x05"

#: Buffers of at least this many bytes travel out of band; smaller ones
#: are copied into the pickle, which costs less than a frame.
OUT_OF_BAND_ABOVE = 1 << 16

#: Most buffers one payload may carry out of band (a bound on the header a
#: receiver parses; more buffers than that travel in the pickle).
MAX_BUFFERS = 1 << 16

#: Buffers start at a multiple of this many bytes from the payload's start.
ALIGN = 64

_PADDING = bytes(ALIGN)

#: Flag of a buffer that was writable where it was pickled.
WRITABLE = 1

#: magic, number of buffers, length of the pickle.
_HEAD = struct.Struct("!4sIQ")

#: length of a buffer, flags.
_SEGMENT = struct.Struct("!QB")


class Segments:
    """
    A framed payload as the list of its parts, not joined: C{len} is its
    length on the wire, C{bytes} joins it (for tests and small uses).
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: list) -> None:
        #: The header, the pickle and the buffers: byte strings or 1-D byte views.
        self.parts = parts
        #: Bytes of all parts.
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"<Segments of {self.size:,} bytes in {len(self.parts)} parts>"


def byte_view(buffer: Any) -> memoryview:
    """A 1-D view of C{buffer}'s bytes (C{buffer} must be contiguous)."""
    view = memoryview(buffer)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def frame(pickled: Any, buffers: list[memoryview]) -> Segments:
    """
    The payload of a pickle with its out-of-band C{buffers} (contiguous
    buffers, in the order the pickler gave them out), not copied.
    """
    if len(buffers) > MAX_BUFFERS:
        raise ValueError(f"{len(buffers):,} out-of-band buffers: at most {MAX_BUFFERS:,}")
    views = [byte_view(buffer) for buffer in buffers]
    header = [_HEAD.pack(MAGIC, len(views), len(pickled))]
    header += [_SEGMENT.pack(len(view), 0 if view.readonly else WRITABLE) for view in views]
    parts = [b"".join(header), pickled]
    offset = len(parts[0]) + len(pickled)
    for view in views:
        pad = -offset % ALIGN
        if pad:
            parts.append(_PADDING[:pad])
        parts.append(view)
        offset += pad + len(view)
    return Segments(parts)


def is_framed(data: Any) -> bool:
    """True if C{data} (bytes or a view) is a framed payload, not a plain pickle."""
    return len(data) >= _HEAD.size and data[:4] == MAGIC


def unframe(data: Any) -> tuple[memoryview, list[tuple[memoryview, int]]]:
    """
    Undo L{frame}: C{(pickle, [(buffer, flags), ...])}, each a view of
    C{data} (nothing copied); L{ValueError} if C{data} is not a well-formed
    framed payload (its lengths must add up to exactly its length).
    """
    view = byte_view(data)
    total = len(view)
    if total < _HEAD.size:
        raise ValueError("truncated payload header")
    magic, count, pickle_length = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError("not a framed payload")
    if count > MAX_BUFFERS:
        raise ValueError(f"payload declares {count:,} buffers: at most {MAX_BUFFERS:,}")
    offset = _HEAD.size + count * _SEGMENT.size
    if offset > total:
        raise ValueError("truncated payload header")
    entries = [_SEGMENT.unpack_from(view, _HEAD.size + i * _SEGMENT.size) for i in range(count)]
    pickled = view[offset : offset + pickle_length]
    offset += pickle_length
    buffers = []
    for length, flags in entries:
        offset += -offset % ALIGN
        buffers.append((view[offset : offset + length], flags))
        offset += length
    if offset != total:
        raise ValueError("payload lengths do not add up to its size")
    return pickled, buffers


def array_from_buffer(typecode: str, buffer: Any) -> array.array:
    """An C{array.array} of C{typecode} holding a copy of C{buffer} (its loader, by reference)."""
    made = array.array(typecode)
    made.frombytes(buffer)
    return made


def memoryview_from_buffer(buffer: Any, format: str, shape: tuple[int, ...]) -> memoryview:
    """A view of C{buffer} with C{format} and C{shape}, not copied (a memoryview's loader, by reference)."""
    view = byte_view(buffer)
    if format == "B" and len(shape) == 1:
        return view
    return view.cast(format, shape)


# -- result references: a big result left in its worker's memory ----------
#
# A job's big result lies in a sealed memory file that its job process
# wrote and its worker holds (L{cw.worker.shared}).  When the job's client
# is on the worker's machine (L{cw.system.machine_identity}), the worker
# sends this reference in the result's place instead of the bytes; the
# master forwards it like any payload, and the client maps the file
# itself, then tells the worker it may close it (L{cw.wire.commands.ReleaseResults}).


class ResultReference(NamedTuple):
    """Where a result lies: bytes C{offset} to C{offset + length} of descriptor C{fd} of process C{pid}."""

    #: The worker process holding the file, and its descriptor of it.
    pid: int
    fd: int
    #: The file's inode: the descriptor must still be this file.
    inode: int
    offset: int
    length: int
    #: The worker's id at its master (a release names it).
    worker: int


#: The first bytes of a result reference (no pickle begins with a zero
#: byte, and L{MAGIC} differs in its last byte).
RESULT_REFERENCE_MAGIC = b"\x00cwr"

#: magic, then the fields of L{ResultReference}.
_RESULT_REFERENCE = struct.Struct("!4sIIQQQI")

#: Bytes of a result reference on the wire.
RESULT_REFERENCE_SIZE = _RESULT_REFERENCE.size


def result_reference(where: ResultReference) -> bytes:
    """The payload that stands for the result lying C{where}."""
    return _RESULT_REFERENCE.pack(RESULT_REFERENCE_MAGIC, *where)


def read_result_reference(payload: Any) -> ResultReference | None:
    """The L{ResultReference} that C{payload} is, or None for any other payload."""
    if len(payload) != RESULT_REFERENCE_SIZE or payload[:4] != RESULT_REFERENCE_MAGIC:
        return None
    return ResultReference(*_RESULT_REFERENCE.unpack(payload)[1:])


# -- references: a payload left in its client's memory --------------------
#
# A client on the same machine as the workers (L{cw.system.machine_identity})
# need not send a big job argument at all: it writes the payload into a
# sealed memory file once (L{cw.wire.memfile}) and sends this reference in
# its place.  The master queues and routes the reference like any payload
# (counting the bytes it stands for, L{payload_size}); a job process on the
# client's machine maps the file itself, and for a worker elsewhere the
# master fetches the bytes from the client first (L{cw.wire.commands.FetchPayload}).

#: The first bytes of a reference (no pickle begins with a zero byte, and
#: L{MAGIC} differs in its last byte).
REFERENCE_MAGIC = b"\x00cwR"

#: magic, the client's pid, its descriptor of the file, the file's inode, bytes.
_REFERENCE = struct.Struct("!4sIIQQ")

#: Bytes of a reference on the wire.
REFERENCE_SIZE = _REFERENCE.size


def reference(pid: int, fd: int, inode: int, length: int) -> bytes:
    """The payload that stands for C{length} bytes in descriptor C{fd} (inode C{inode}) of process C{pid}."""
    return _REFERENCE.pack(REFERENCE_MAGIC, pid, fd, inode, length)


def kept_reference(length: int) -> bytes:
    """
    The payload a master holds in place of a big argument it let go of
    once a worker had it: C{length} bytes its client keeps (process 0: in
    no memory file; the master fetches them, L{is_kept}).
    """
    return reference(0, 0, 0, length)


def is_kept(where: tuple[int, int, int, int] | None) -> bool:
    """Whether a L{read_reference} result is a L{kept_reference}."""
    return where is not None and where[0] == 0


def read_reference(payload: Any) -> tuple[int, int, int, int] | None:
    """C{(pid, fd, inode, length)} of a L{reference}, or None for any other payload."""
    if len(payload) != REFERENCE_SIZE or payload[:4] != REFERENCE_MAGIC:
        return None
    return _REFERENCE.unpack(payload)[1:]


def payload_size(payload: Any) -> int:
    """
    The bytes C{payload} stands for: its length, or for a L{reference}, the
    length of the payload it refers to (what flow control and the payload
    limit count, wherever the bytes lie).
    """
    n = len(payload)
    if n == REFERENCE_SIZE and payload[:4] == REFERENCE_MAGIC:
        return _REFERENCE.unpack(payload)[4]
    return n
