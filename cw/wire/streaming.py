"""
Writing big AMP boxes a piece at a time, and receiving them without
holding their chunks twice.

L{amp.BinaryBoxProtocol.sendBox} serializes a box into one byte string and
hands it to the transport, which keeps it (and may join it with whatever
else is waiting) until the peer has read it all.  For a box carrying a
payload of a gigabyte that is a second and a third copy of the payload,
written as fast as the process can make them, however slowly the peer
reads.

L{StreamingSender} writes a box whose values add up to L{STREAM_ABOVE}
bytes or more as a pull producer instead: the transport asks for the next
L{PIECE} bytes only once it has sent the previous ones, and each piece is
cut from the payload where it lies.  So a sender holds the payload and one
piece, and sends no faster than its peer reads (TCP's own flow control, or
a pipe's, reaches back to the sender).  Boxes sent meanwhile queue behind
the big one, in order, as AMP requires.

On a plain TCP connection with nothing buffered in Twisted, the pieces
skip Twisted's write path (which would join them into one string, then
send 128 KiB per system call): many at a time, up to L{SEND_AT_ONCE}
bytes, go to the socket in one C{sendmsg} call as they lie (views of the
value, of its memory mapping where it was received into one), and what
the socket does not take waits, already signed, for it to drain
(L{StreamingSender._send_pieces}).  TLS, pipes and a connection with bytes
buffered ahead take the usual path.

On an authenticated connection (L{cw.wire.auth.AuthGate}), each streamed box
is signed as it is written: every piece goes into the box's MAC on its way
to the transport, and the MAC closes the box (L{cw.wire.auth.BoxMac}).

L{ChunkReceiver} is the receiving half: AMP keeps every value of a box in
the box until the command's answer is sent, so a value chunked by
L{cw.wire.commands.Blob} would be held as chunks for as long as the command runs
(a whole job, in a job process) beside the joined value.  It appends each
chunk to one buffer as it arrives and frees it, and puts the buffer in the
box when the box is complete, so a receiver holds one copy.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import weakref
from collections import deque

from twisted.internet import error
from twisted.internet.interfaces import IPullProducer
from twisted.protocols.amp import AmpBox
from zope.interface import implementer

from cw.core.records import CHUNK, chunk_key, size_key
from cw.system import populate_range, unfilled_bytearray
from cw.wire import memfile
from cw.wire.forwarding import Relay
from cw.wire.private import (
    SEND_BUFFERS,
    current_box,
    current_key,
    data_arrived,
    expect_key,
    resume_when_writable,
    send_buffers,
    sending_socket,
    set_read_size,
    tls_starting,
    write_through,
)

#: Boxes with at least this many bytes of values are streamed.
STREAM_ABOVE = 1 << 20

#: Bytes handed to the transport at a time while streaming.
PIECE = 1 << 20

#: Bytes gathered for one system call (C{sendmsg}) while streaming straight
#: to a socket (L{StreamingSender._send_pieces}), and sent in one turn of
#: the reactor at most (the socket's buffer usually takes less).
SEND_AT_ONCE = 8 << 20
SEND_PER_TURN = 16 << 20

_LENGTH = struct.Struct("!H")


#: Stands in a sender's queue for the end of a box that is signed as it is
#: written: replaced by the box's MAC and end when its turn comes.
_SIGNED_END = object()


def box_pieces(box, end=b"\0\0") -> list:
    """The wire form of an AMP box as a list of pieces (values not copied)."""
    pieces = []
    for key, value in sorted(box.items(), key=lambda item: item[0]):
        pieces += [_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value]
    pieces.append(end)
    return pieces


def _after(pieces: list, sent: int) -> list:
    """What of C{pieces} (bytes-like, in order) follows their first C{sent} bytes."""
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            rest = pieces[index:]
            if sent:
                rest[0] = memoryview(piece)[sent:]
            return rest
        sent -= len(piece)
    return []


@implementer(IPullProducer)
class StreamingSender:
    """
    Mixin for L{amp.AMP} subclasses: big boxes are written piece by piece
    as the transport drains (see the module docstring).  The transport must
    accept a pull producer (TCP, TLS and pipe transports do); if it does
    not, boxes are written whole.
    """

    _outgoing: deque | None = None
    #: Bytes of streamed boxes not yet handed to the transport.
    outgoing_bytes = 0
    #: Signs boxes once a session started (see L{cw.wire.auth.AuthGate}); None: unsigned.
    box_signer = None
    #: The MAC of the streamed box being written.
    _writing_mac = None
    #: A piece of the streamed boxes was written (and may not have drained yet).
    _wrote_piece = False
    #: Pieces taken off the queue (and signed) that the socket did not take
    #: yet (L{_send_pieces}): written before anything else; their bytes.
    _unsent: list | None = None
    _unsent_bytes = 0

    def stream_progress(self) -> None:
        """Called after each piece is written; override to watch L{outgoing_bytes}."""

    def stream_sent(self, size: int) -> None:
        """
        Called with the number of bytes of streamed boxes just sent
        straight to the socket (L{_send_pieces}), which the transport's
        C{write} never saw; override to count them.
        """

    def stream_drained(self) -> None:
        """
        Called when the transport asks for more of a streamed box after
        writing the last piece: the peer's side took that piece in.
        L{cw.wire.liveness.SignsOfLife} counts it as hearing from the peer.
        """

    def sendBox(self, box):
        if self._outgoing is None and sum(len(v) for v in box.values()) < STREAM_ABOVE:
            if self.box_signer is None and self.transport is not None and not tls_starting(self):
                # Unsigned (a job process's pipe): at once where nothing waits ahead.
                data = box.serialize()
                if not write_through(self.transport, data):
                    self.transport.write(data)
                return None
            return super().sendBox(box)
        if self.transport is None:
            raise error.ConnectionLost()
        signed = self.box_signer is not None
        pieces = box_pieces(box, _SIGNED_END if signed else b"\0\0")
        size = sum(len(piece) for piece in pieces[:-1]) + 2
        if self._outgoing is not None:
            self._outgoing.extend(pieces)
            self.outgoing_bytes += size
            return
        if not hasattr(self.transport, "registerProducer") or tls_starting(self):
            return super().sendBox(box)
        try:
            self._outgoing = deque(pieces)
            self.outgoing_bytes = size
            self._wrote_piece = False  # the first call of resumeProducing follows at once
            self.transport.registerProducer(self, False)
        except RuntimeError:
            # Someone else's producer is registered: write the box whole.
            self._outgoing = None
            self.outgoing_bytes = 0
            if signed:
                self.transport.write(self.box_signer.sign(b"".join(pieces[:-1])))
            else:
                self.transport.write(b"".join(pieces))

    def send_relay(self, relay) -> bool:
        """
        Start writing a box forwarded as it arrives (a
        L{cw.wire.forwarding.Relay}), signed as its pieces come; boxes sent
        meanwhile wait behind it.  False, having written nothing, unless
        the transport takes a producer and nothing is being streamed
        already (a box forwarded never waits behind another).
        """
        if self.transport is None or tls_starting(self):
            return False
        if self._outgoing is not None or not hasattr(self.transport, "registerProducer"):
            return False
        try:
            self._outgoing = deque([relay])
            self.outgoing_bytes = 0
            self._wrote_piece = False
            self.transport.registerProducer(self, False)
        except RuntimeError:
            self._outgoing = None
            return False
        return True

    def waiting_on_relay(self) -> bool:
        """
        Whether what is written to this peer now is a box forwarded as it
        arrives (L{send_relay}) waiting for its source, the peer having
        taken all of it so far: boxes sent to the peer meanwhile (a
        heartbeat) wait behind it, so its silence is not its own.
        """
        outgoing = self._outgoing
        return bool(outgoing) and isinstance(outgoing[0], Relay) and outgoing[0].starved

    def _relay_pieces(self, relay, limit: int) -> bool:
        """
        Put what C{relay} (at the head of the queue) has, up to C{limit}
        bytes, ahead of it in the queue, with the box's end once it has
        ended (the relay then leaves the queue); False if it had nothing.
        """
        outgoing = self._outgoing
        taken, done = relay.take(limit)
        if done:
            outgoing.popleft()
            outgoing.appendleft(_SIGNED_END if self.box_signer is not None else b"\0\0")
            self.outgoing_bytes += 2
        if taken:
            outgoing.appendleft(taken)  # (counted in outgoing_bytes as it arrived)
        return bool(taken) or done

    def resumeProducing(self) -> None:
        if self._outgoing is None:
            return
        if self._wrote_piece:
            self.stream_drained()
        sock = sending_socket(self.transport)
        if sock is None:
            self._write_pieces()
        else:
            self._send_pieces(sock)

    def _take(self, batch: list, limit: int, buffers: int, peeked: list | None = None) -> int:
        """
        Move the queue's next pieces, signed, to C{batch} (after what it
        holds), up to about C{limit} bytes and C{buffers} pieces, cutting
        a long value into views; stop early where a relay has nothing yet.
        Return their size as L{outgoing_bytes} counts it.  Given
        C{peeked}, what a relay at the head has is added last, as it lies
        in the relay, unsigned and left there (L{Relay.peek}), and
        C{peeked} is set to C{[relay, index of its first piece in batch,
        views to release]}.
        """
        outgoing = self._outgoing
        signer = self.box_signer
        size = 0
        while outgoing and size < limit and len(batch) < buffers:
            piece = outgoing[0]
            if isinstance(piece, Relay):
                if peeked is None:
                    if not self._relay_pieces(piece, limit - size):
                        break
                elif piece.pending:
                    pieces, views = piece.peek(limit - size, buffers - len(batch))
                    peeked += (piece, len(batch), views)
                    batch += pieces
                    break
                elif piece.ended:
                    self._relay_pieces(piece, 0)  # its end
                else:
                    break
                continue
            outgoing.popleft()
            if piece is _SIGNED_END:
                batch.append(signer.trailer(self._writing_mac))
                self._writing_mac = None
                size += 2  # as counted in sendBox
                continue
            if size + len(piece) > limit and len(piece) > PIECE:
                # Cut a long value; the rest goes back to the front.
                cut = limit - size
                view = memoryview(piece)
                outgoing.appendleft(view[cut:])
                piece = view[:cut]
            if signer is not None:
                if self._writing_mac is None:
                    self._writing_mac = signer.start()
                self._writing_mac.update(piece)
            batch.append(piece)
            size += len(piece)
        return size

    def _sent_from_relay(self, batch: list, sent: int, relay, at: int, views: list) -> list:
        """
        C{sent} bytes of C{batch} went, whose pieces from C{at} on are
        what C{relay} had (L{Relay.peek}): sign and take those of them
        that went (the rest stays in the relay), release the views, and
        return the pieces before C{at} (whose unsent rest, signed
        already, waits as usual).
        """
        before = sum(len(piece) for piece in batch[:at])
        taken = sent - before
        if taken > 0:
            if self.box_signer is not None:
                if self._writing_mac is None:
                    self._writing_mac = self.box_signer.start()
                left = taken
                for piece in batch[at:]:
                    if len(piece) <= left:
                        self._writing_mac.update(piece)
                        left -= len(piece)
                    else:
                        self._writing_mac.update(piece[:left])
                        break
            relay.consume(taken)
            self.outgoing_bytes -= taken  # (counted as it arrived)
        kept = batch[:at]
        batch.clear()
        for view in reversed(views):
            view.release()  # the buffer may have to grow
        return kept

    def _starved(self) -> None:
        """Nothing to write: the relay at the head of the queue wakes this once fed."""
        self._outgoing[0].starved = True
        self._wrote_piece = False

    def _finish(self) -> None:
        """All written: boxes sent from now on are written (or streamed) anew."""
        self._outgoing = None
        self.outgoing_bytes = 0
        self.transport.unregisterProducer()

    def _write_pieces(self) -> None:
        """
        Write the next L{PIECE} bytes to the transport, joined into one
        string: where the socket is not ours to write (TLS, a pipe, bytes
        buffered ahead).  Pieces left unsent by L{_send_pieces} go first.
        """
        batch = self._unsent or []
        counted = self._unsent_bytes
        self._unsent, self._unsent_bytes = None, 0
        counted += self._take(batch, PIECE, 1 << 30)
        if not batch:
            self._starved()
            return
        self.outgoing_bytes -= counted
        if not self._outgoing:
            self._finish()
        self.transport.write(b"".join(batch))
        self._wrote_piece = True
        self.stream_progress()

    def _send_pieces(self, sock) -> None:
        """
        Send the next pieces straight to the transport's socket, many at a
        time, as they lie (C{sendmsg}: no piece joined or copied, a value
        in a memory mapping sent from it), up to L{SEND_PER_TURN} bytes or
        until the socket is full; what it does not take waits for it to
        drain (signed already, ahead of the queue), and the transport asks
        for more once it is writable (L{cw.wire.private.resume_when_writable}).
        """
        outgoing = self._outgoing
        sent_now = 0
        more = False
        while True:
            batch = self._unsent or []
            counted = self._unsent_bytes
            self._unsent, self._unsent_bytes = None, 0
            peeked: list = []
            counted += self._take(batch, SEND_AT_ONCE, SEND_BUFFERS, peeked)
            if not batch:
                if outgoing:
                    self._starved()
                break
            length = sum(len(piece) for piece in batch)
            try:
                sent = send_buffers(sock, batch)
            except OSError:
                sent = None
            if peeked:
                # What the relay had: what was sent is signed and taken, the rest stays there.
                batch = self._sent_from_relay(batch, sent or 0, *peeked)
            if sent is None:
                # Broken: the transport finds the loss as it writes them.
                self.outgoing_bytes -= counted
                if not outgoing:
                    self._finish()
                self.transport.write(b"".join(batch))
                self._wrote_piece = True
                self.stream_progress()
                return
            self.outgoing_bytes -= counted
            sent_now += sent
            if sent:
                self.stream_sent(sent)
            if sent < length:
                rest = _after(batch, sent)
                if rest:
                    self._unsent = rest
                    self._unsent_bytes = sum(len(piece) for piece in rest)
                    self.outgoing_bytes += self._unsent_bytes
                more = True
                break
            if not outgoing:
                break
            if sent_now >= SEND_PER_TURN:
                more = True  # the socket may take more: at the reactor's next turn
                break
        if more:
            resume_when_writable(self.transport)
        elif not outgoing:
            self._finish()
        if sent_now:
            self._wrote_piece = True
            self.stream_progress()

    def pauseProducing(self) -> None:
        pass  # a pull producer is only asked when the transport wants more

    def stopProducing(self) -> None:
        for piece in self._outgoing or ():
            if isinstance(piece, Relay):
                piece.outgoing_lost()
        self._outgoing = None
        self._unsent, self._unsent_bytes = None, 0
        self._writing_mac = None
        self.outgoing_bytes = 0
        self.stream_progress()


_CHUNK_KEY = re.compile(rb"\A(.+)\.([0-9]+)\Z")

#: A chunked value at least this long, whose length the sender gave
#: (L{cw.core.records.size_key}), is assembled in a buffer of that length.
ASSEMBLE_IN_PLACE_ABOVE = 1 << 20

#: Bytes of such a buffer mapped at a time, ahead of the writes.
POPULATE_WINDOW = 16 << 20

#: Bytes read from a TCP connection at a time while such a value arrives
#: (L{cw.wire.private.set_read_size}; Twisted reads 64 KiB otherwise).
BIG_READ = 4 << 20


#: A buffer kept in a L{SpareBuffers} is longer than the value it is made
#: for by this share of it, at most L{SPARE_SLACK_MOST} bytes, so that a
#: value a little longer (the next job's pickle, a little different) fits
#: too.
SPARE_SLACK = 1 / 64
SPARE_SLACK_MOST = 1 << 20


def spare_length(size: int) -> int:
    """The length of a buffer kept in a L{SpareBuffers} for a value of C{size} bytes (whole pages)."""
    return -(-(size + min(int(size * SPARE_SLACK), SPARE_SLACK_MOST)) // 4096) * 4096


#: Seconds a L{SpareBuffers} keeps its buffers after it last handed one out.
SPARE_KEPT = 10.0


class SpareBuffers:
    """
    The buffers that big values were assembled in on one connection
    (L{ChunkReceiver.spare_buffers}), kept for the values that follow: a
    buffer nothing uses any more (the value was loaded into objects of its
    own, a C{bytes} result, or its user let go of it) receives the next
    value of about its length in pages already mapped, instead of fresh
    memory that the kernel must find, clear and map page by page, then
    unmap and free again (measured: 0.35 of the 0.05 + 0.35 CPU seconds
    that assembling a gigabyte in fresh memory costs, on a virtual machine).

    A buffer is in use while anything refers to it: the value's views, an
    array loaded from it, a view the user kept (every view of it holds a
    reference to it); it is never handed out again before that ends, so a
    value stays valid for as long as anything uses it, whatever arrives
    after it.  Buffers go C{keep} seconds after one was last handed out
    (those still in use then belong to their users alone), or when the
    connection ends (L{clear}): an idle client holds no spare memory.
    """

    #: A buffer is reused for a value of at least this share of its length
    #: (a value that its user keeps holds all of its buffer).
    FILLED_AT_LEAST = 0.75
    #: Unused buffers kept besides the one taken (L{take}).
    UNUSED_KEPT = 1

    def __init__(self, clock, keep: float = SPARE_KEPT) -> None:
        self._clock = clock
        self._keep = keep
        self._buffers: list[bytearray] = []
        self._reads: bytearray | None = None
        self._expiry = None

    def take(self, size: int) -> bytearray | None:
        """
        A buffer of at least C{size} bytes, its contents undefined and its
        pages mapped, kept from earlier values and unused now; or None.
        Of the other unused buffers, the L{UNUSED_KEPT} used last are
        kept, the others go: a client that let go of many values at once
        keeps no more spare memory than that.
        """
        self._touch()
        buffers = self._buffers
        chosen, unused = None, []
        for i in range(len(buffers)):
            if self._unused(i):
                if chosen is None and self.FILLED_AT_LEAST * len(buffers[i]) <= size <= len(buffers[i]):
                    chosen = i
                else:
                    unused.append(i)
        gone = set(unused[: max(0, len(unused) - self.UNUSED_KEPT)])  # the least recently used
        if chosen is not None:
            gone.add(chosen)
        if gone:
            self._buffers = [buffer for i, buffer in enumerate(buffers) if i not in gone]
        if chosen is None:
            return None
        # At the end, so that the least recently used come first.
        self._buffers.append(buffers[chosen])
        return buffers[chosen]

    def _references(self, i: int) -> int:
        buffer = self._buffers[i]
        return sys.getrefcount(buffer)

    def _unused(self, i: int) -> bool:
        """
        Whether nothing but this object refers to its buffer C{i}: a value
        being assembled in it does, and a view of it (of its views, an
        array built on one) refers to it for as long as it lasts.
        """
        return self._references(i) <= _ONLY_SPARE

    def hold(self, buffer: bytearray) -> None:
        """Keep C{buffer}, a new one a value is being assembled in, for later values."""
        self._touch()
        self._buffers.append(buffer)

    def reads(self, size: int) -> bytearray:
        """
        The buffer that connections keeping their big values here read
        into (L{cw.wire.private.set_read_size}'s C{reuse}), of C{size} bytes
        or more: one for all of them (one process reads one at a time),
        kept as the spare buffers are.
        """
        self._touch()
        if self._reads is None or len(self._reads) < size:
            self._reads = unfilled_bytearray(size)
        return self._reads

    def __len__(self) -> int:
        return len(self._buffers)

    def clear(self) -> None:
        """Keep nothing: a buffer still in use goes once its last user lets go of it."""
        self._buffers = []
        self._reads = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _touch(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.reset(self._keep)
        else:
            self._expiry = self._clock.callLater(self._keep, self.clear)

    def ended(self, buffer: bytearray) -> None:
        """
        A value assembled in C{buffer} (one of these) ended: keep it for
        C{keep} seconds from now, again if it went meanwhile (a value that
        took longer than that to arrive).
        """
        self._touch()
        if not any(kept is buffer for kept in self._buffers):
            self._buffers.append(buffer)


def _only_spare() -> int:
    """What L{SpareBuffers._references} counts for a buffer that only its list refers to."""
    spare = SpareBuffers(None)
    spare._buffers.append(bytearray(1))
    return spare._references(0)


#: References to an unused buffer (L{SpareBuffers._unused}), as counted
#: by this interpreter: the list's, those of the count itself.
_ONLY_SPARE = _only_spare()


class _Assembly:
    """
    One chunked value being received (L{ChunkReceiver}): its chunks
    written one after the other into one buffer.  Given the value's length
    (C{size}, 0 if unknown or not worth it), the buffer is allocated at
    that length at once, unfilled (L{cw.system.unfilled_bytearray}), and
    mapped a window at a time ahead of the writes, in one system call per
    window instead of a page fault per page (a trap of microseconds, more
    in a virtual machine: 262,144 of them for a gigabyte), nor the copies
    of a buffer grown as chunks arrive; or, given C{spare}, one of the
    buffers kept there is reused, mapped already (L{SpareBuffers}).  A
    value that turns out longer than it said grows the buffer; one that
    turns out shorter is cut to what arrived, so no unfilled byte is ever
    seen.
    """

    __slots__ = ("following", "buffer", "filled", "mapped", "spare", "size")

    def __init__(self, first: bytes, size: int, spare: SpareBuffers | None = None) -> None:
        #: The number of the chunk expected next.
        self.following = 2
        #: The length the value said it has (0: unknown).
        self.size = size
        #: The buffer is kept in C{spare} (it may be longer than the value).
        self.spare = False
        buffer, mapped = None, len(first)
        if size > len(first):
            buffer = spare.take(size) if spare is not None else None
            if buffer is not None:
                self.spare, mapped = True, len(buffer)  # mapped by the values it held
            else:
                try:
                    # Kept for later values: a little longer (SPARE_SLACK).
                    buffer = unfilled_bytearray(spare_length(size) if spare is not None else size)
                except MemoryError:
                    buffer = None
                if buffer is not None and spare is not None:
                    spare.hold(buffer)
                    self.spare = True
        if buffer is None:
            buffer = bytearray(first)
        else:
            buffer[: len(first)] = first
        self.buffer = buffer
        #: Bytes of C{buffer} written; bytes of it mapped ahead of the writes.
        self.filled, self.mapped = len(first), mapped

    def map_to(self, end: int) -> None:
        """Map the buffer up to C{end} (no more than its length), a window at a time, before writing there."""
        if end > self.mapped:
            buffer = self.buffer
            mapped, self.mapped = self.mapped, min(len(buffer), max(end, self.mapped + POPULATE_WINDOW))
            populate_range(buffer, mapped, self.mapped)

    def write(self, piece) -> None:
        """Append C{piece} (bytes-like) to the value."""
        buffer, filled = self.buffer, self.filled
        end = filled + len(piece)
        if end <= len(buffer):
            self.map_to(end)
            buffer[filled:end] = piece
        else:
            buffer[filled:] = piece  # longer than it said: grow
        self.filled = end

    def finish(self) -> bytearray | memoryview:
        """The value, whole (cut to what arrived)."""
        if self.filled < len(self.buffer):
            if self.spare:
                return memoryview(self.buffer)[: self.filled]  # the buffer stays whole for later values
            del self.buffer[self.filled :]
        return self.buffer


#: A chunk with at least this many bytes still to come, of a value that
#: said its length and is assembled in memory, is read straight into the
#: value's buffer, with the chunks after it (L{ChunkReceiver.read_plan}).
IN_PLACE_ABOVE = 16 << 10

#: Buffers one such read fills at most: chunks and the keys between them.
IN_PLACE_BUFFERS = 128


class _ReadPlan:
    """
    Where one read goes (L{ChunkReceiver.read_plan}): C{views}, in order,
    the rest of the chunk being read (in its value's buffer), then for each
    chunk after it the key and length it should have (into a small buffer
    of its own) and its bytes (in the value's buffer).
    """

    __slots__ = ("buffer", "views", "parts")

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer
        self.views: list[memoryview] = []
        #: Per view: C{(None, start, length)} for bytes of the value at
        #: C{start} of its buffer; C{(expected, slot, length)} for a key
        #: and length expected to read C{expected}, read into C{slot}.
        self.parts: list[tuple] = []

    def value(self, view: memoryview, start: int, length: int) -> None:
        self.views.append(view[start : start + length])
        self.parts.append((None, start, length))

    def header(self, expected: bytes) -> None:
        slot = bytearray(len(expected))
        self.views.append(memoryview(slot))
        self.parts.append((expected, slot, len(expected)))

    def received(self, length: int) -> _InPlace:
        """What the read brought (C{length} bytes), to hand to C{dataReceived}; the views let go of."""
        arrived = []
        for expected, where, size in self.parts:
            if length <= 0:
                break
            arrived.append((expected, where, min(size, length)))
            length -= size
        for view in self.views:
            view.release()
        read = _InPlace(sum(part[2] for part in arrived), self.buffer, arrived)
        self.views = self.parts = []
        return read


class _InPlace:
    """
    A read that went where a L{_ReadPlan} said, given to C{dataReceived}
    in place of the bytes (its length is theirs): per part of the plan
    that bytes reached, C{(expected, where, length)} as in
    L{_ReadPlan.parts}, C{length} cut to what arrived.
    """

    __slots__ = ("length", "buffer", "parts")

    def __init__(self, length: int, buffer: bytearray, parts: list) -> None:
        self.length, self.buffer, self.parts = length, buffer, parts

    def __len__(self) -> int:
        return self.length


class _FileAssembly:
    """
    One chunked value being received (L{ChunkReceiver}) straight into a
    new memory file (L{cw.wire.memfile}), written there piece by piece as
    it arrives (C{pwrite}), from C{lead} bytes into the file on: for a
    value its receiver hands on to another process of this machine (a job
    process), which then maps that file rather than one the receiver
    copies the value into (L{ChunkReceiver.assemble_in_file}).  Writing
    to a file also costs less than writing to fresh anonymous memory:
    the kernel gives the file pages without clearing them first, and the
    receiver never maps (clears, then fills) pages of its own.  Once
    whole, the file is sealed and the value is a view of a copy-on-write
    mapping of it (L{memfile.map_received}).  Where the file cannot be
    written (out of memory), the value goes on in memory (L{_Assembly}).
    """

    __slots__ = ("following", "fd", "lead", "filled", "inner", "_closer", "__weakref__")

    def __init__(self, first: bytes, size: int, lead: int, fd: int) -> None:
        self.following = 2
        self.fd, self.lead, self.filled = fd, lead, 0
        #: The value in memory instead, once the file failed.
        self.inner: _Assembly | None = None
        # Closed if the box never completes (its MAC failed, the connection was lost).
        self._closer = weakref.finalize(self, os.close, fd)
        try:
            os.ftruncate(fd, lead + size)
        except OSError:
            pass  # grown as written
        self.write(first)

    @classmethod
    def made(cls, first: bytes, size: int, lead: int) -> _FileAssembly | None:
        """One in a new memory file, or None if none can be made."""
        try:
            fd = memfile.create()
        except OSError:
            return None
        return cls(first, size, lead, fd)

    def write(self, piece) -> None:
        """Append C{piece} (bytes-like) to the value."""
        if self.inner is not None:
            self.inner.write(piece)
            return
        done, length = 0, len(piece)
        try:
            while done < length:
                done += os.pwrite(self.fd, piece[done:] if done else piece, self.lead + self.filled + done)
        except OSError:
            self._in_memory()
            self.inner.write(piece[done:] if done else piece)
            return
        self.filled += length

    def _in_memory(self) -> None:
        """Go on in memory, with what the file holds so far."""
        written = os.pread(self.fd, self.filled, self.lead) if self.filled else b""
        self.inner = _Assembly(written, 0)
        self._closer()

    def finish(self) -> memoryview:
        """The value, whole: a view of its file, mapped (or of the memory it went on in)."""
        if self.inner is None and self.filled:
            end = self.lead + self.filled
            try:
                os.ftruncate(self.fd, end)  # cut to what arrived
                mapping = memfile.map_received(self.fd, end)
            except OSError:
                self._in_memory()
            else:
                self._closer.detach()  # the mapping owns the file now
                return memoryview(mapping)[self.lead : end]
        if self.inner is None:
            self._in_memory()
        return memoryview(self.inner.finish())


class ChunkReceiver:
    """
    Mixin for L{amp.BinaryBoxProtocol} subclasses (listed after any mixin
    that inspects incoming values, such as L{cw.wire.auth.AuthGate}): appends
    the chunks of each L{cw.wire.commands.Blob} value to one buffer as they
    arrive (in order: see L{cw.core.records.chunk_key}), each chunk freed at
    once, and puts the whole value in the box when the box is complete, as
    a C{memoryview}.  The view is writable, so that the NumPy arrays a
    payload carries out of band (L{cw.wire.pickling}) load writable
    without a copy.  Chunks out of order are left in the box, where the
    argument parser refuses them.

    It also parses what arrives itself, rather than through
    C{Int16StringReceiver.dataReceived}, which joins what is left of the
    last read with each new one and slices every value out of that (two
    copies of every byte of a payload, on every hop).  Here the bytes of
    a chunk being assembled go from the read straight into the value's
    buffer, as they arrive, with no copy of their own: a mixin that
    inspects values sees them through L{chunk_started} and L{chunk_piece}
    instead of C{proto_value}.  Keys and other values (small) are parsed
    as AMP does and go through the C{proto_*} states as before.

    A box that has arrived whole in one read, holding no chunked value
    (the common small box: a job, a result), is parsed in one pass instead
    and handed to L{whole_box} with its wire bytes, which a mixin that
    inspects boxes checks at once (the MAC, L{cw.wire.auth.AuthGate});
    that saves a lone job's round trip most of the per-key work of its six
    boxes (issue 18).  Anything else, or a box L{whole_box} declines, is
    parsed key by key as above.

    While a big value that says its length arrives, a TCP connection
    reads L{BIG_READ} bytes at a time instead of 64 KiB (fewer system
    calls, reactor turns and passes through every C{dataReceived}), and
    a value that its receiver hands on to another process goes straight
    into a memory file (L{assemble_in_file}, L{_FileAssembly}).
    """

    #: Largest box accepted (L{cw.wire.auth.AuthGate} sets it): no value
    #: said to be longer gets a buffer of that length.
    max_box_bytes = 1 << 62
    #: Where values that say their length are assembled, reusing the
    #: buffers of earlier ones (L{SpareBuffers}), while a TCP connection
    #: reads them into one buffer of its own (L{set_read_size}'s C{reuse});
    #: None: always in new memory.
    spare_buffers: SpareBuffers | None = None
    #: Values being assembled in the current box: name -> L{_Assembly}.
    _assembling: dict | None = None
    #: The assembly receiving the chunk being read, and its bytes still to come.
    _chunk: list | None = None
    _chunk_left = 0
    #: A key or value (with its length prefix) that has partly arrived.
    _partial: bytearray | None = None
    #: What arrived while the parser was paused, to parse once resumed.
    _held = b""
    #: The connection reads L{BIG_READ} bytes at a time (a big value is arriving).
    _big_reads = False

    def chunk_started(self, length: int) -> bool:
        """
        A chunk of C{length} bytes (after its 2-byte length prefix) starts;
        False to refuse it (after dropping the connection).
        """
        return True

    def chunk_piece(self, piece) -> None:
        """The next bytes of the chunk being read (a C{memoryview}, valid only during the call)."""

    def chunk_stored(self, buffer: bytearray, start: int, end: int) -> None:
        """
        Bytes C{start} to C{end} of C{buffer}, the buffer of the value being
        assembled, now hold the next bytes of the chunk being read (the
        buffer may grow later, keeping them, but never shrinks while the
        value is assembled; see L{cw.wire.forwarding}).  Only for values
        assembled in memory, not in a file (L{assemble_in_file}).
        """

    def whole_box(self, box, wire, last: int) -> bool:
        """
        C{box} (an C{amp.AmpBox}) arrived whole: its wire bytes are C{wire}
        (a C{memoryview}, valid only during the call, from its first key to
        its end), and its last key starts at C{last} in them.  Receive it
        and return True; or return False, having done nothing, to have it
        parsed key by key instead (a mixin that finds something wrong lets
        that parse refuse it, as it would any box).
        """
        self.boxReceiver.ampBoxReceived(box)
        return True

    def assemble_in_file(self, name: bytes, first: bytes) -> int | None:
        """
        Where in a new memory file to assemble chunked value C{name}, of
        L{ASSEMBLE_IN_PLACE_ABOVE} bytes or more (its length given), whose
        first chunk is C{first}: an offset (so that something inside it
        starts aligned), or None (the default) to assemble it in memory
        (see L{_FileAssembly}).
        """
        return None

    def _parse_whole(self, view, offset: int, size: int, whole: bytes | None = None) -> int:
        """
        If a whole box without chunked values starts at C{offset} in
        C{view} (and the parser is between boxes), hand it to
        L{whole_box}; return where the box ends if it was taken, else
        C{offset}.  C{whole}: the bytes C{view} shows, if they are a
        C{bytes} (the common read): keys and values are sliced from it,
        one object each instead of a view and its copy.
        """
        unpack = _LENGTH.unpack_from
        box = AmpBox()
        position, last = offset, offset
        while True:
            if position + 2 > size:
                return offset
            (length,) = unpack(view, position)
            if not length:
                break
            if length > self.MAX_LENGTH:
                return offset
            start = position + 2
            value = start + length
            if value + 2 > size:
                return offset
            key = whole[start:value] if whole is not None else bytes(view[start:value])
            if b"." in key or key in box:
                return offset  # a chunk or a chunk count (assembled key by key), or a key twice
            (length,) = unpack(view, value)
            end = value + 2 + length
            if end > size:
                return offset
            box[key] = whole[value + 2 : end] if whole is not None else bytes(view[value + 2 : end])
            last, position = position, end
        end = position + 2
        if not box or not self.whole_box(box, view[offset:end], last - offset):
            return offset
        return end

    def _assembly(self, key: bytes, claim: bool) -> list | None:
        """
        The assembly that C{key}'s value continues, if it is the next
        chunk of one (starting one at chunk 2 if C{claim}), else None.
        """
        match = _CHUNK_KEY.match(key)
        if match is None:
            return None
        name, index = match.group(1), int(match.group(2))
        assembly = self._assembling.get(name) if self._assembling else None
        if assembly is None and index == 2:
            box = current_box(self)
            first = box.get(name)
            if not isinstance(first, bytes):
                return None
            size = self._size_hint(box.get(size_key(name)))
            lead = self.assemble_in_file(name, first) if size and claim else None
            if lead is not None:
                assembly = _FileAssembly.made(first, size, lead)
            if assembly is None:
                assembly = _Assembly(first, size, self.spare_buffers if claim else None)
            if size and claim and not self._big_reads:
                self._big_reads = True  # until the box ends
                spare = self.spare_buffers
                if spare is not None:
                    set_read_size(self.transport, BIG_READ, spare.reads(BIG_READ), self.read_plan)
                else:
                    set_read_size(self.transport, BIG_READ, False)
            if claim:
                if self._assembling is None:
                    self._assembling = {}
                self._assembling[name] = assembly
        if assembly is None or index != assembly.following:
            return None
        return assembly

    def _size_hint(self, value) -> int:
        """
        The length a chunked value says it has (its L{size_key}), if it is
        worth a buffer of that size and believable: no more than a box may
        hold on this connection (C{max_box_bytes}); else 0.
        """
        if not isinstance(value, bytes) or not value.isdigit() or len(value) > 20:
            return 0
        size = int(value)
        return size if ASSEMBLE_IN_PLACE_ABOVE <= size <= self.max_box_bytes else 0

    def proto_value(self, string):
        assembly = self._assembly(current_key(self), True)
        if assembly is None:
            return super().proto_value(string)
        assembly.write(string)
        assembly.following += 1
        return expect_key(self)

    def _start_chunk(self, length: int) -> bool:
        """
        If the value of C{length} bytes that starts now is the next chunk
        of an assembly, read it straight into that (True); else False.
        """
        if self.state != "value" or length > self.MAX_LENGTH:
            return False
        assembly = self._assembly(current_key(self), True)
        if assembly is None:
            return False
        if not self.chunk_started(length):
            self.paused = True  # refused: parse nothing more
            return True
        self._chunk, self._chunk_left = assembly, length
        if not length:
            self._end_chunk()
        return True

    def _chunk_bytes(self, view) -> int:
        """Take what C{view} holds of the chunk being read; return how many bytes."""
        piece = view[: self._chunk_left]
        self.chunk_piece(piece)
        chunk = self._chunk
        start = chunk.filled
        chunk.write(piece)
        if type(chunk) is _Assembly:
            self.chunk_stored(chunk.buffer, start, chunk.filled)
        self._chunk_left -= len(piece)
        if not self._chunk_left:
            self._end_chunk()
        return len(piece)

    def _end_chunk(self) -> None:
        self._chunk.following += 1
        self._chunk = None
        self.state = expect_key(self)

    def read_plan(self) -> _ReadPlan | None:
        """
        Where the next read should go, if the chunk being read belongs to a
        value assembled in memory that said its length, with at least
        L{IN_PLACE_ABOVE} bytes still to come: straight into the value's
        buffer, where the parse would copy them (one copy fewer), and so
        the chunks after it, each after a small buffer for the key and
        length it should have (they follow from the chunk's key, the
        value's length and L{CHUNK}), up to L{BIG_READ} bytes in all.  The
        read is then parsed from there (L{_received_in_place}).  None (the
        read goes into the connection's buffer and is parsed as usual)
        otherwise.
        """
        chunk, left = self._chunk, self._chunk_left
        if type(chunk) is not _Assembly or left < IN_PLACE_ABOVE or self.paused or self._held:
            return None
        start, total, buffer = chunk.filled, chunk.size, chunk.buffer
        if not total or start + left > min(total, len(buffer)) or self._partial is not None:
            return None
        key = current_key(self)
        dot = key.rfind(b".")
        name, width, index = key[:dot], len(key) - dot - 1, chunk.following
        plan = _ReadPlan(buffer)
        view = memoryview(buffer)
        try:
            plan.value(view, start, left)
            end, room = start + left, BIG_READ - left
            while end < total and room > 0 and len(plan.views) + 2 <= IN_PLACE_BUFFERS:
                index += 1
                size = min(CHUNK, total - end)
                following = chunk_key(name, index, width)
                plan.header(_LENGTH.pack(len(following)) + following + _LENGTH.pack(size))
                take = min(size, room)
                plan.value(view, end, take)
                end, room = end + take, room - take
        finally:
            view.release()
        chunk.map_to(end)
        return plan

    def _received_in_place(self, read: _InPlace) -> None:
        """
        Parse a read that went where L{read_plan} said: bytes of the value
        taken where they lie, each key and length between them parsed as
        usual once it reads as expected; from the first part that is not
        what was expected (a key, the box's end) on, the rest is copied
        out and parsed as usual.
        """
        parts = read.parts
        for i, (expected, where, length) in enumerate(parts):
            chunk = self._chunk
            if expected is None:
                if (
                    self.paused
                    or type(chunk) is not _Assembly
                    or chunk.buffer is not read.buffer
                    or chunk.filled != where
                    or length > self._chunk_left
                ):
                    return self._parse_rest(read, i)
                self._chunk_in_place(chunk, length)
            elif self.paused or length < len(expected) or where != expected:
                return self._parse_rest(read, i)
            else:
                self._parse(bytes(where))

    def _parse_rest(self, read: _InPlace, first: int) -> None:
        """Parse as usual what a planned read brought to its parts from C{first} on (copied out first)."""
        rest = []
        for expected, where, length in read.parts[first:]:
            if expected is None:
                rest.append(bytes(memoryview(read.buffer)[where : where + length]))
            else:
                rest.append(bytes(where[:length]))
        self._parse(b"".join(rest))

    def _chunk_in_place(self, chunk: _Assembly, length: int) -> None:
        """The next C{length} bytes of the chunk being read arrived in place, in C{chunk}'s buffer."""
        start = chunk.filled
        with memoryview(chunk.buffer) as view, view[start : start + length] as piece:
            self.chunk_piece(piece)
        chunk.filled = start + length
        self.chunk_stored(chunk.buffer, start, start + length)
        self._chunk_left -= length
        if not self._chunk_left:
            self._end_chunk()

    def dataReceived(self, data):
        if self.innerProtocol is not None:
            return super().dataReceived(data)
        data_arrived(self)
        if type(data) is _InPlace:
            return self._received_in_place(data)
        return self._parse(data)

    def _parse(self, data) -> None:
        """Parse C{data}, the bytes read (or any part of them)."""
        if self._held:
            data, self._held = self._held + data, b""
        view = memoryview(data)
        size, offset = len(view), 0
        while offset < size:
            if self.paused:
                self._held = bytes(view[offset:])
                return
            if self._chunk is not None:
                offset += self._chunk_bytes(view[offset:])
                continue
            partial = self._partial
            if partial is not None:
                # Complete the length prefix, then the item, from this read.
                need = 2 - len(partial) if len(partial) < 2 else 0
                if need:
                    partial += view[offset : offset + need]
                    offset += min(need, size - offset)
                    if len(partial) < 2:
                        return
                    (length,) = _LENGTH.unpack(partial)
                    if length > self.MAX_LENGTH:
                        self._partial = None
                        self.lengthLimitExceeded(length)
                        return
                    if self._start_chunk(length):
                        self._partial = None
                        continue
                (length,) = _LENGTH.unpack(partial[:2])
                take = min(2 + length - len(partial), size - offset)
                partial += view[offset : offset + take]
                offset += take
                if len(partial) < 2 + length:
                    return
                self._partial = None
                self.stringReceived(bytes(partial[2:]))
                continue
            if self.state == "init":
                end = self._parse_whole(view, offset, size, data if type(data) is bytes else None)
                if end != offset:
                    offset = end
                    continue
            if size - offset < 2:
                self._partial = bytearray(view[offset:])
                return
            (length,) = _LENGTH.unpack(view[offset : offset + 2])
            if length > self.MAX_LENGTH:
                self.lengthLimitExceeded(length)
                return
            if self._start_chunk(length):
                offset += 2
                continue
            end = offset + 2 + length
            if end > size:
                self._partial = bytearray(view[offset:])
                return
            string = bytes(view[offset + 2 : end])
            offset = end
            self.stringReceived(string)

    def connectionLost(self, reason):
        # The values cut off go now, not once this protocol is collected.
        self._assembling = self._chunk = None
        super().connectionLost(reason)

    def discard_assembly(self) -> None:
        """Forget the values being assembled: the box ended and is discarded (L{cw.wire.auth.AuthGate})."""
        self._assembling = None

    def proto_key(self, string):
        if not string and self._assembling:
            if self._big_reads:
                self._big_reads = False
                set_read_size(self.transport, None)
            assembling, self._assembling = self._assembling, None
            box = current_box(self)
            for name, assembly in assembling.items():
                count = box.get(name + b".n", b"")
                if getattr(assembly, "spare", False):
                    self.spare_buffers.ended(assembly.buffer)
                if count.isdigit() and int(count) == assembly.following - 1:
                    del box[name + b".n"]
                    box.pop(size_key(name), None)
                    box[name] = memoryview(assembly.finish())
                else:
                    box[name + b".n"] = b"malformed"  # refused by the parser
        return super().proto_key(string)
