"""
Cut-through forwarding: passing a big box on, chunk by chunk, as it
arrives, instead of after the whole box.

A payload between machines crosses the master: a worker's result on its
way to its client, a client's argument on its way to a worker.  Received
whole and only then sent on, the hops take turns (each busy while the
others wait), and the payload moves at about a third of what each hop
could do.  Here the master starts the outgoing box as soon as the first
chunk of its one chunked value (L{cw.wire.commands.Blob}) has arrived and
says where it goes (L{ForwardingReceiver.relay_destination}); every later
chunk goes on as it arrives.  A worker's result goes on as it came (a
L{Relay}); the argument a client sends in answer to
L{cw.wire.commands.FetchPayload} goes on as the payload of its job, in a
L{cw.wire.commands.RunJobs} box of its own (a L{RechunkingRelay}).

Authentication is not weakened.  Every box is MAC-checked end to end by
each hop (L{cw.wire.auth}): the outgoing box is the master's own, signed
by the master as it writes it, and its closing MAC is written only once
the incoming box has ended and its MAC checked (its own AMP parse having
found nothing wrong).  If the incoming box does not check out (a changed
byte, a wrong MAC: the connection is dropped and the peer logged), or its
sender drops mid-box, or what it carries turns out otherwise than its
first chunk said, the master ends the outgoing box as I{void}: it
completes the value being written (zeros), adds a L{VOID_KEY} key saying
why, and signs that.  The receiver checks the MAC as for any box and,
seeing the key, discards the whole box, which is never dispatched
(L{cw.wire.auth.AuthGate}); the connection carrying it goes on.  The job
whose result was voided runs again, as the job of any lost worker does;
the job whose argument was voided is not run by the worker (it never saw
the job), and fails or runs again as the jobs of a client that left do.

Memory and flow control.  The master still receives the value into the
one buffer it assembles it in (L{cw.wire.streaming.ChunkReceiver}), at
the pace its sender sends; the relay keeps no copy of its own, only
ranges of that buffer not yet written (which keep it alive until they
are), and copies each piece once on its way to the transport, or, to a
plain TCP socket, not at all: the sender sends those ranges as they lie
and takes what the socket took (L{Relay.peek}, L{Relay.consume}).  So
the master holds one copy, as before, and a slow or stopped receiver holds up
no sender: the worker's connection is read on, and its other results go
to their clients meanwhile.  What waits for the receiver counts as bytes
not yet sent to it (C{outgoing_bytes}), so the master's flow control for
a client that does not read its results (C{--max-unsent-bytes}, stop
dispatching its jobs; C{--client-read-timeout}) applies as to any result.
A box is forwarded only to a peer to which nothing is being streamed
already; otherwise it is received whole first and sent as before.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import re
import struct
from collections import deque

from twisted.internet import interfaces, tcp
from twisted.logger import Logger
from twisted.protocols import amp

from cw.core.records import CHUNK, chunk_key, size_key
from cw.wire.auth import VOID_KEY
from cw.wire.private import current_box, current_key

log = Logger(namespace="cw.forwarding")

#: Bytes a relay whose sender found it empty gathers before it wakes the
#: sender (or its box's end): one write of a few reads, not one per read.
WAKE_BYTES = 256 << 10

#: Boxes whose chunked value is at least this long are forwarded as they
#: arrive, where their destination is known; smaller ones whole.
RELAY_ABOVE = 1 << 20

_LENGTH = struct.Struct("!H")
_CHUNK_KEY = re.compile(rb"\A(.+)\.([0-9]+)\Z")


def _item(data) -> list:
    """A key or value as it is written: its length prefix, then its bytes."""
    return [_LENGTH.pack(len(data)), bytes(data)]


def relays_to(proto) -> bool:
    """
    Whether a box may be forwarded to C{proto}: a L{StreamingSender}
    writing to a plain TCP connection (not TLS, whose pull producers are
    polled rather than asked once the buffer drains), not closing.
    """
    transport = getattr(proto, "transport", None)
    return (
        isinstance(transport, tcp.Connection)
        and not interfaces.ISSLTransport.providedBy(transport)
        and transport.connected
        and not transport.disconnecting
        and hasattr(proto, "send_relay")
    )


class Relay:
    """
    One box being forwarded: fed by the receiving connection
    (L{ForwardingReceiver}), drained by the sending one
    (L{cw.wire.streaming.StreamingSender}, which writes it, signing what
    it takes, as its transport asks for more).  What arrived and was not
    yet taken waits as ranges of the buffer the value is assembled in (no
    copy of its own), and counts as bytes still to send to that peer
    (C{outgoing_bytes}).  Ends with L{close} (the incoming box checked
    out: the sender closes the box with its MAC) or L{void}.
    """

    def __init__(self, incoming, outgoing) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        #: What arrived and was not yet taken: whole keys and values
        #: (bytes), and C{[buffer, start, end]} ranges of the value's buffer.
        self.pending: deque = deque()
        #: Bytes of the value being written still to come.
        self.value_left = 0
        #: Ended (closed or voided): nothing more is fed.
        self.ended = False
        #: Why it was voided (None: closed, or not ended yet).
        self.why: str | None = None
        #: Bytes arrived and not yet taken.
        self.pending_bytes = 0
        #: The sender found nothing to take: feeding it L{WAKE_BYTES} wakes it.
        self.starved = False
        #: The outgoing connection was lost: what arrives is dropped.
        self.lost = False

    def _added(self, size: int) -> None:
        self.outgoing.outgoing_bytes += size
        self.pending_bytes += size
        if self.starved and self.pending_bytes >= WAKE_BYTES:
            self.starved = False
            self.outgoing.resumeProducing()

    def _bytes(self, data: bytes) -> None:
        if not self.lost:
            self.pending.append(data)
            self._added(len(data))

    def items(self, items: list[tuple[bytes, bytes]]) -> None:
        """Whole keys and values, in order."""
        self._bytes(b"".join(b"".join(_item(key) + _item(value)) for key, value in items))

    def start_value(self, key: bytes, length: int) -> None:
        """A value of C{length} bytes under C{key} starts; its bytes follow (L{stored})."""
        self.value_left = length
        self._bytes(b"".join(_item(key)) + _LENGTH.pack(length))

    def stored(self, buffer: bytearray, start: int, end: int) -> None:
        """The next bytes of the value being written: C{buffer[start:end]}, kept there."""
        self.value_left -= end - start
        self._range(buffer, start, end)

    def _range(self, buffer: bytearray, start: int, end: int) -> None:
        if self.lost:
            return
        pending = self.pending
        if pending:
            last = pending[-1]
            if type(last) is list and last[0] is buffer and last[2] == start:
                last[2] = end  # the chunk goes on: one range
                self._added(end - start)
                return
        pending.append([buffer, start, end])
        self._added(end - start)

    def close(self, items: list[tuple[bytes, bytes]]) -> None:
        """The incoming box checked out: write C{items}, then the sender's signed end."""
        self.items(items)
        self._end()

    def void(self, why: str) -> None:
        """
        End the box so that its receiver discards it: the value being
        written completed with zeros, then L{VOID_KEY} saying C{why}, then
        the sender's signed end.
        """
        if self.ended:
            return
        self.why = why
        padding = bytes(self.value_left) if self.value_left > 0 else b""
        self.value_left = 0
        self._bytes(padding + b"".join(_item(VOID_KEY) + _item(why.encode("utf-8")[:1000])))
        self._end()

    def _end(self) -> None:
        self.ended = True
        if self.starved:
            self.starved = False
            self.outgoing.resumeProducing()

    def take(self, limit: int) -> tuple[bytes, bool]:
        """
        For the sender: up to about C{limit} bytes of what arrived, in one
        string (the one copy the master makes of what it forwards), and
        whether that is all (the box's end follows).
        """
        pieces, views = self.peek(limit, len(self.pending))
        try:
            taken = b"".join(pieces)
        finally:
            for view in reversed(views):
                view.release()  # the buffer may grow again
        self.consume(len(taken))
        return taken, self.ended and not self.pending

    def peek(self, limit: int, buffers: int) -> tuple[list, list]:
        """
        For a sender writing straight to a socket (C{sendmsg}): what
        arrived, up to about C{limit} bytes in at most C{buffers} pieces,
        as it lies (its bytes, and views of the value's buffer: no copy),
        left in place until L{consume} takes what was sent; and every view
        made, which the sender must release before it returns (the buffer
        may have to grow).
        """
        pieces, views, size = [], [], 0
        for item in self.pending:
            if size >= limit or len(pieces) >= buffers:
                break
            if type(item) is bytes:
                pieces.append(item)
                size += len(item)
                continue
            buffer, start, end = item
            stop = min(end, start + limit - size)
            view = memoryview(buffer)
            part = view[start:stop]
            views += (view, part)
            pieces.append(part)
            size += stop - start
        return pieces, views

    def consume(self, size: int) -> None:
        """Take the first C{size} bytes of what arrived: sent (see L{peek})."""
        pending = self.pending
        self.pending_bytes -= size
        while size:
            item = pending[0]
            if type(item) is bytes:
                if len(item) > size:
                    pending[0] = item[size:]
                    return
                pending.popleft()
                size -= len(item)
            else:
                if item[2] - item[1] > size:
                    item[1] += size
                    return
                pending.popleft()
                size -= item[2] - item[1]

    def outgoing_lost(self) -> None:
        """The outgoing connection is gone: drop what arrives."""
        self.lost = True
        self.pending.clear()
        self.pending_bytes = 0


class RechunkingRelay(Relay):
    """
    A relay that writes the value it forwards under another name, after a
    prefix, in chunks of its own cut as L{cw.wire.commands.Blob} cuts a
    value (with its size key and chunk count): the payload of a
    L{cw.wire.commands.FetchPayload} answer going on as the job's in a
    L{cw.wire.commands.RunJobs} box.  Fed the incoming value's bytes
    (L{begin} with its first chunk, then L{stored}); the incoming chunks'
    keys and lengths are not written.
    """

    def __init__(self, incoming, outgoing, name: bytes, prefix: bytes, total: int) -> None:
        super().__init__(incoming, outgoing)
        self.name, self.prefix = name, prefix
        #: Bytes of the value written: the prefix and C{total} bytes forwarded.
        self.out_total = len(prefix) + total
        self.count = -(-self.out_total // CHUNK)
        self.width = len(str(self.count))
        self.index = 1
        self.written = 0

    def begin(self, items: list[tuple[bytes, bytes]], first) -> None:
        """Write C{items} (whole keys and values), then the value: the prefix, then C{first}."""
        self.items(items)
        self.value_left = min(CHUNK, self.out_total)
        self._bytes(b"".join(_item(self.name)) + _LENGTH.pack(self.value_left))
        self._feed(self.prefix)
        self._feed(bytes(first))

    def start_value(self, key: bytes, length: int) -> None:
        pass  # the chunks are this relay's own

    def _next_chunk(self) -> None:
        if self.index == 1:
            self._bytes(b"".join(_item(size_key(self.name)) + _item(b"%d" % self.out_total)))
        self.index += 1
        self.value_left = min(CHUNK, self.out_total - self.written)
        key = chunk_key(self.name, self.index, self.width)
        self._bytes(b"".join(_item(key)) + _LENGTH.pack(self.value_left))

    def _feed(self, data: bytes) -> None:
        while data:
            if not self.value_left:
                if self.written >= self.out_total:
                    return  # longer than said: voided at the end
                self._next_chunk()
            take = min(self.value_left, len(data))
            self._bytes(data[:take])
            data = data[take:]
            self.value_left -= take
            self.written += take

    def stored(self, buffer: bytearray, start: int, end: int) -> None:
        while start < end:
            if not self.value_left:
                if self.written >= self.out_total:
                    return
                self._next_chunk()
            stop = min(end, start + self.value_left)
            self._range(buffer, start, stop)
            self.value_left -= stop - start
            self.written += stop - start
            start = stop

    def close(self, items: list[tuple[bytes, bytes]]) -> None:
        if self.written != self.out_total:
            self.void(f"{self.written:,} bytes forwarded where {self.out_total:,} were due")
            return
        super().close([(self.name + b".n", b"%d" % self.count)])


class ForwardingReceiver:
    """
    Mixin for the master's AMP protocol, listed after
    L{cw.wire.auth.AuthGate} (so that it sees a box's end only once its
    MAC checked) and before L{cw.wire.streaming.ChunkReceiver}: forwards
    a box whose one chunked value goes elsewhere as it arrives (see the
    module docstring).  The box is still received as usual, and
    dispatched once whole; its responder finds what was forwarded in
    L{relayed} (None if nothing).
    """

    #: The box being forwarded, if any.
    _relay: Relay | None = None
    #: The name of its chunked value, and the length its first chunk said.
    _relay_name = b""
    _relay_total = 0
    _relay_bytes = 0
    _relay_chunks = 0
    #: Why the box being forwarded turned out otherwise than it said.
    _relay_wrong: str | None = None
    #: While a forwarded box is dispatched (its responder runs): its L{Relay}.
    relayed: Relay | None = None

    def relay_destination(self, command: bytes | None, answer: bytes | None, first, total: int):
        """
        Where to forward a box whose command is C{command} (or that answers
        the question tagged C{answer}), whose one chunked value is C{total}
        bytes long and starts with C{first}: None to receive it only; a
        protocol to forward it to as it is; or C{(protocol, items, name,
        prefix)} to forward its value as the value C{name} of another box,
        after C{prefix}, behind C{items} (whole keys and values; see
        L{RechunkingRelay}).  Override.
        """
        return None

    def relay_voided(self, why: str) -> None:
        """A box being forwarded was voided (see L{Relay.void}), for C{why}."""

    def chunk_started(self, length: int) -> bool:
        relay = self._relay
        if relay is None:
            self._maybe_relay()
            relay = self._relay
        if relay is not None:
            key = current_key(self)
            if not key.startswith(self._relay_name + b"."):
                self._relay_wrong = f"a second chunked value, {key!r}"
            relay.start_value(key, length)
            self._relay_chunks += 1
        return super().chunk_started(length)

    def _maybe_relay(self) -> None:
        """At the first chunk after the first of a value: forward its box if its destination says so."""
        match = _CHUNK_KEY.match(current_key(self) or b"")
        if match is None or int(match.group(2)) != 2:
            return
        name = match.group(1)
        box = current_box(self)
        first, total = box.get(name), box.get(size_key(name))
        command, answer = box.get(amp.COMMAND), box.get(amp.ANSWER)
        kind = amp.COMMAND if command is not None else amp.ANSWER
        if set(box) != {kind, name, size_key(name)} or not isinstance(first, bytes):
            return  # an answer asked for, or another value: not forwarded
        if not (isinstance(total, bytes) and total.isdigit() and len(total) < 20):
            return
        destination = self.relay_destination(command, answer, first, int(total))
        if destination is None:
            return
        if isinstance(destination, tuple):
            destination, items, out_name, prefix = destination
            relay = RechunkingRelay(self, destination, out_name, prefix, int(total))
        else:
            relay, items = Relay(self, destination), list(box.items())
        if not relays_to(destination) or not destination.send_relay(relay):
            return
        if isinstance(relay, RechunkingRelay):
            relay.begin(items, first)
        else:
            relay.items(items)
        self._relay, self._relay_name, self._relay_total = relay, name, int(total)
        self._relay_bytes, self._relay_chunks, self._relay_wrong = len(first), 0, None

    def chunk_stored(self, buffer: bytearray, start: int, end: int) -> None:
        relay = self._relay
        if relay is not None:
            relay.stored(buffer, start, end)
            self._relay_bytes += end - start
        super().chunk_stored(buffer, start, end)

    def proto_value(self, string):
        # A value that is no chunk (those go through chunk_piece), after
        # the forwarded box started: only its chunk count is expected.
        if self._relay is not None:
            key = current_key(self)
            if key != self._relay_name + b".n":
                self._relay_wrong = f"an unexpected value under {key!r}"
            elif string != b"%d" % (self._relay_chunks + 1):
                self._relay_wrong = "a wrong chunk count"
        return super().proto_value(string)

    def proto_key(self, string):
        relay = self._relay
        if relay is not None and not string:
            # The box ended and its MAC checked (AuthGate is ahead).
            self._relay = None
            wrong = self._relay_wrong
            if wrong is None and self._relay_bytes != self._relay_total:
                wrong = f"{self._relay_bytes:,} bytes where {self._relay_total:,} were said"
            if wrong is None and self._relay_name + b".n" not in current_box(self):
                wrong = "no chunk count"
            if wrong is not None:
                relay.void(f"the box forwarded turned out malformed: {wrong}")
                self.relay_voided(wrong)
                log.warn(
                    "{peer}: a box forwarded as it arrived turned out malformed ({why}): voided",
                    peer=self.peer_description(),
                    why=wrong,
                )
                return super().proto_key(string)
            relay.close([(self._relay_name + b".n", b"%d" % (self._relay_chunks + 1))])
            self.relayed = relay
            try:
                return super().proto_key(string)
            finally:
                self.relayed = None
        return super().proto_key(string)

    def connectionLost(self, reason):
        relay, self._relay = self._relay, None
        if relay is not None:
            why = self.rejected or "its sender's connection was lost before the end of it"
            relay.void(f"the box forwarded did not arrive whole: {why}")
            self.relay_voided(why)
        super().connectionLost(reason)
