"""
What the master takes for a client's progress in reading its results
(L{cw.master.service.Master.watch_output}, which drops a client that reads
nothing for C{--client-read-timeout}): the bytes the kernel accepted
towards it, whichever way they went (through Twisted's write buffer, or
straight to the socket by C{sendmsg}, L{cw.wire.streaming}).  With a fake
clock, a transport whose write buffer the test empties, and a fake socket:
no I/O.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cw.master.protocol import MasterProtocol
from cw.master.service import Master
from cw.test.peers import pattern
from cw.test.wire.test_forwarding import result_box
from cw.wire import streaming

MIB = 1 << 20
#: The client's read timeout (seconds); it takes in a MiB a second, far slower than a result arrives.
TIMEOUT = 3.0
#: The result: many times what the client takes in one timeout.
SIZE = 16 * MIB


class BufferedTransport(StringTransport):
    """
    A transport with Twisted's write buffer (C{dataBuffer}, which
    L{cw.master.protocol.transport_backlog} reads): bytes written wait there
    until the kernel takes them (L{accept}).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dataBuffer = bytearray()
        #: Bytes the kernel took in all, either way.
        self.accepted = 0
        self.aborted = False

    def write(self, data) -> None:
        super().write(data)
        self.dataBuffer += data

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def abortConnection(self) -> None:
        self.aborted = True

    def accept(self, size: int) -> None:
        """The kernel takes up to C{size} bytes of the buffer; emptied, it asks the producer for more."""
        size = min(size, len(self.dataBuffer))
        del self.dataBuffer[:size]
        self.accepted += size
        if not self.dataBuffer and self.producer is not None:
            self.producer.resumeProducing()


class FakeSocket:
    """What L{cw.wire.private.send_buffers} sends to: takes up to C{room} bytes, then is full."""

    def __init__(self, transport: BufferedTransport) -> None:
        self.transport = transport
        self.room = 0

    def send(self, buffers: list) -> int:
        size = min(self.room, sum(len(piece) for piece in buffers))
        self.room -= size
        self.transport.accepted += size
        return size


class ReadProgressTests(SynchronousTestCase):
    """A client taking in one big result slowly but steadily: not dropped, its progress never going back."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.master = Master(clock=self.clock, heartbeat=0, client_read_timeout=TIMEOUT)
        self.proto = MasterProtocol(self.master)
        self.transport = BufferedTransport()
        # Not connectionMade: there is no socket to set options on.
        self.proto.transport = self.transport
        self.proto._count_writes()
        self.proto.peer_id = self.master.client_joined(self.proto, {"cwd": "", "path": []})
        self.proto.role = "client"
        self.reads: list[int] = []
        unsent_results = self.master.scheduler.unsent_results

        def recorded(client, unsent, read, now):
            self.reads.append(read)
            return unsent_results(client, unsent, read, now)

        self.patch(self.master.scheduler, "unsent_results", recorded)
        self.master.start_watching_clients()
        self.addCleanup(self.master.stop_watching_clients)

    def take_in(self, step) -> None:
        """
        Send a small box and then the big result, and call C{step()} (the
        client takes in a MiB) every second until all has gone: the client
        is never dropped, the read progress the master saw never went back,
        and it ends as the bytes the kernel took.
        """
        self.proto.sendBox(result_box(b"small"))
        self.proto.sendBox(result_box(pattern(SIZE)))
        for _ in range(4 * SIZE // MIB):  # a MiB and a little goes in two steps
            if self.proto.unsent_bytes() == 0:
                break
            step()
            self.clock.advance(1.0)
            self.assertFalse(self.transport.aborted, "the client was dropped while it read")
        self.assertEqual(self.proto.unsent_bytes(), 0)
        self.master.watch_output(self.proto)
        self.assertGreater(self.transport.accepted, SIZE)
        self.assertEqual(self.reads[-1], self.transport.accepted)
        backwards = [(a, b) for a, b in zip(self.reads, self.reads[1:], strict=False) if b < a]
        self.assertEqual(backwards, [], "the read progress went back")

    def test_through_the_write_buffer(self):
        """Pieces written to the transport (TLS, a pipe): progress as the kernel takes them."""
        self.take_in(lambda: self.transport.accept(MIB))

    def test_by_sendmsg(self):
        """Pieces sent straight to the socket (plain TCP): the same."""
        sock = FakeSocket(self.transport)
        self.patch(streaming, "sending_socket", lambda transport: None if transport.dataBuffer else sock)
        self.patch(streaming, "send_buffers", lambda sock, buffers: sock.send(buffers))
        self.patch(streaming, "resume_when_writable", lambda transport: None)

        def step():
            if self.transport.dataBuffer:
                self.transport.accept(MIB)  # the small box went to the buffer
            else:
                sock.room = MIB
                self.proto.resumeProducing()  # the socket is writable

        self.take_in(step)
