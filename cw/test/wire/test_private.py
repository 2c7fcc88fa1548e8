"""Tests of cw.wire.private: the uses of Twisted's and ampoule's private names."""

from __future__ import annotations

import fcntl
import os
import pathlib
import re
import socket
import struct
import termios

from ampoule import main as ampoule_main
from twisted.internet import defer, process, protocol, reactor, stdio
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.protocols import amp
from twisted.trial import unittest

from cw.test.procs import until
from cw.wire import private


class JobBootstrapTests(unittest.TestCase):
    """The job process's bootstrap is ampoule's, edited, or nothing at all."""

    def test_edited(self):
        text = private.job_bootstrap("PREFIX = 1\n")
        self.assertTrue(text.startswith("PREFIX = 1\n"))
        self.assertIn("LogLevel.warn", text)
        self.assertNotIn("LogLevel.info", text)
        self.assertIn("redirectStandardIO=False", text)

    def test_changed_ampoule_text_fails_loudly(self):
        """If ampoule's bootstrap no longer holds what cw edits, starting job processes fails, saying why."""
        self.patch(
            ampoule_main, "BOOTSTRAP", ampoule_main.BOOTSTRAP.replace("LogLevel.info", "LogLevel.debug")
        )
        with self.assertRaises(RuntimeError) as caught:
            private.job_bootstrap("")
        self.assertIn("'LogLevel.info'", str(caught.exception))


class PrivateNamesTests(unittest.TestCase):
    """Twisted's and ampoule's private names appear in cw.wire.private only."""

    #: Modules allowed a private name, besides cw.wire.private (the exception
    #: its docstring names).
    EXCEPTIONS = {("_catchUp", "worker/pool.py")}

    def test_only_in_private(self):
        """
        No module of cw but cw.wire.private (and the tests) names one of
        L{private.PRIVATE_NAMES}: a new use outside it fails here.
        """
        root = pathlib.Path(private.__file__).resolve().parent.parent
        found = []
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative.startswith("test/") or relative == "wire/private.py":
                continue
            text = path.read_text(encoding="utf-8")
            for name in private.PRIVATE_NAMES:
                if (name, relative) not in self.EXCEPTIONS and re.search(rf"\b{name}\b", text):
                    found.append(f"{name} in cw/{relative}")
        self.assertEqual(found, [])

    def test_names_are_private(self):
        """Each listed name is one Twisted or ampoule still has (else the list is stale)."""
        import inspect

        from ampoule import pool
        from twisted.internet import _posixstdio, abstract, endpoints, posixbase

        modules = (amp, endpoints, pool, ampoule_main, abstract, posixbase, _posixstdio)
        sources = "".join(inspect.getsource(module) for module in modules)
        for name in private.PRIVATE_NAMES:
            self.assertRegex(sources, rf"\b{name}\b")


class PushTests(unittest.TestCase):
    """
    L{private.push} writes what a transport has buffered at once, not when
    the reactor next finds it writable; through wrappers too.
    """

    def connect(self, protocol_factory):
        """Listen on loopback, connect C{protocol_factory()}: a Deferred of it and of what arrives."""
        received = defer.Deferred()

        class Sink(protocol.Protocol):
            def dataReceived(self, data):
                if not received.called:
                    received.callback(data)

        server = protocol.Factory.forProtocol(Sink)
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)

        def listening(port):
            self.addCleanup(port.stopListening)
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
                protocol.Factory.forProtocol(protocol_factory)
            )

        def connected(proto):
            self.addCleanup(proto.transport.loseConnection)
            return proto, received

        return d.addCallback(listening).addCallback(connected)

    def check(self, wrap):
        def sent(result):
            proto, received = result
            transport = proto.transport
            transport.write(b"hello")
            self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)
            private.push(wrap(transport))
            self.assertFalse(transport._tempDataBuffer or transport.dataBuffer)
            return received.addCallback(self.assertEqual, b"hello")

        return self.connect(protocol.Protocol).addCallback(sent)

    def test_tcp(self):
        return self.check(lambda transport: transport)

    def test_through_wrapper(self):
        """A wrapper whose C{transport} is the connection (TLS, a protocol wrapper) is looked through."""

        class Wrapper:
            def __init__(self, transport):
                self.transport = transport

        return self.check(Wrapper)

    def test_nothing_buffered(self):
        """Nothing to write, or no transport at all: nothing happens."""
        private.push(None)
        private.push(object())


class WriteNowTests(unittest.TestCase):
    """
    L{private.write_now} writes to a plain TCP connection's socket at once
    (from any thread) only while nothing is buffered ahead; L{private.can_write_now}
    says when.
    """

    connect = PushTests.connect

    def test_writes_when_nothing_buffered(self):
        def sent(result):
            proto, received = result
            self.assertTrue(private.can_write_now(proto.transport))
            self.assertEqual(private.write_now(proto.transport, b"hello"), 5)
            return received.addCallback(self.assertEqual, b"hello")

        return self.connect(protocol.Protocol).addCallback(sent)

    def test_not_behind_buffered_bytes(self):
        """Bytes buffered for the reactor go first: nothing is written ahead of them."""

        def declines(transport):
            self.assertFalse(private.can_write_now(transport))
            self.assertEqual(private.write_now(transport, b"second"), 0)

        return declined_behind_buffered(
            self, declines, lambda transport: self.assertTrue(private.can_write_now(transport))
        )

    def test_not_tls_or_closing(self):
        """TLS (its bytes pass through OpenSSL), a closing connection, or no TCP connection: never."""
        from twisted.internet import interfaces
        from zope.interface import directlyProvides

        self.assertFalse(private.can_write_now(None))
        self.assertFalse(private.can_write_now(object()))
        self.assertEqual(private.write_now(object(), b"x"), 0)

        def sent(result):
            proto, received = result
            transport = proto.transport
            directlyProvides(transport, interfaces.ISSLTransport)
            self.assertFalse(private.can_write_now(transport))
            directlyProvides(transport)
            self.assertTrue(private.can_write_now(transport))
            transport.loseConnection()
            self.assertFalse(private.can_write_now(transport))

        return self.connect(protocol.Protocol).addCallback(sent)


class WriteThroughTests(unittest.TestCase):
    """
    L{private.write_through} writes a box straight to a plain TCP socket or
    a job process's pipe when nothing is buffered ahead of it (what the
    descriptor does not take is buffered behind it), and declines (writing
    nothing) for TLS, wrappers, a connector that holds writes, a closing
    connection or bytes already buffered.
    """

    connect = PushTests.connect

    def test_tcp_at_once(self):
        def sent(result):
            proto, received = result
            transport = proto.transport
            self.assertTrue(private.write_through(transport, b"hello"))
            self.assertFalse(transport._tempDataBuffer or transport.dataBuffer)
            return received.addCallback(self.assertEqual, b"hello")

        return self.connect(protocol.Protocol).addCallback(sent)

    def test_not_behind_buffered_bytes(self):
        return declined_behind_buffered(
            self, lambda transport: self.assertFalse(private.write_through(transport, b"second"))
        )

    def test_rest_buffered_in_order(self):
        """A socket that takes part of the box: the rest waits in Twisted's buffer and follows in order."""
        done = defer.Deferred()
        data = os.urandom(1 << 16) * 256  # 16 MiB: more than a loopback socket takes at once
        got = []

        class Sink(protocol.Protocol):
            def dataReceived(self, chunk):
                got.append(chunk)
                if sum(map(len, got)) >= len(data) + 4 and not done.called:
                    done.callback(b"".join(got))

        server = protocol.Factory.forProtocol(Sink)
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)

        def listening(port):
            self.addCleanup(port.stopListening)
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
                protocol.Factory.forProtocol(protocol.Protocol)
            )

        def connected(proto):
            self.addCleanup(proto.transport.loseConnection)
            transport = proto.transport
            self.assertTrue(private.write_through(transport, data))
            self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)
            self.assertFalse(private.write_through(transport, b"next"))
            transport.write(b"next")
            return done

        d.addCallback(listening).addCallback(connected)
        return d.addCallback(lambda received: self.assertTrue(received == data + b"next"))

    def test_not_tls_wrapper_or_closing(self):
        from twisted.internet import interfaces
        from zope.interface import directlyProvides

        class Wrapper:
            def __init__(self, transport):
                self.transport = transport

        self.assertFalse(private.write_through(None, b"x"))
        self.assertFalse(private.write_through(object(), b"x"))

        def sent(result):
            proto, received = result
            transport = proto.transport
            self.assertFalse(private.write_through(Wrapper(transport), b"x"))
            directlyProvides(transport, interfaces.ISSLTransport)
            self.assertFalse(private.write_through(transport, b"x"))
            directlyProvides(transport)
            transport.loseConnection()
            self.assertFalse(private.write_through(transport, b"x"))
            self.assertFalse(transport._tempDataBuffer or transport.dataBuffer)

        return self.connect(protocol.Protocol).addCallback(sent)

    def pipe(self):
        """A pipe: its read end, and a Twisted writer of its write end (as a child process's stdin)."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        writer = process.ProcessWriter(reactor, None, 3, w)
        self.addCleanup(os.close, w)
        self.addCleanup(writer.stopReading)
        return r, writer

    def test_ampoule_connector(self):
        """To a job process: through ampoule's pipe to it, unless its connector holds writes."""
        r, writer = self.pipe()

        class Process:
            pipes = {ampoule_main.TO_CHILD: writer}

        class Holding(ampoule_main.AMPConnector):
            held = True

            def write(self, data):
                raise AssertionError("written through")

            def passes_writes(self):
                return not self.held

        plain = ampoule_main.AMPConnector(amp.AMP())
        plain.transport = Process()
        self.assertTrue(private.write_through(plain, b"box"))
        self.assertEqual(os.read(r, 100), b"box")
        holding = Holding(amp.AMP())
        holding.transport = Process()
        self.assertFalse(private.write_through(holding, b"box"))
        holding.held = False
        self.assertTrue(private.write_through(holding, b"box2"))
        self.assertEqual(os.read(r, 100), b"box2")

    def test_standard_io(self):
        """From a job process: through its standard I/O's writer."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        sink, source = os.pipe()
        self.addCleanup(os.close, source)
        io = stdio.StandardIO(protocol.Protocol(), stdin=sink, stdout=w, reactor=reactor)
        self.addCleanup(io.loseConnection)
        self.assertTrue(private.write_through(io, b"answer"))
        self.assertEqual(os.read(r, 100), b"answer")


def declined_behind_buffered(case, declines, pushed=lambda transport: None):
    """
    Connect (L{PushTests.connect}), buffer C{b"first"} for the reactor,
    call C{declines(transport)} (which asserts that nothing is written
    ahead of it), push, call C{pushed(transport)}, and check the peer got
    only C{b"first"}.
    """

    def sent(result):
        proto, received = result
        proto.transport.write(b"first")
        declines(proto.transport)
        private.push(proto.transport)
        pushed(proto.transport)
        return received.addCallback(case.assertEqual, b"first")

    return PushTests.connect(case, protocol.Protocol).addCallback(sent)


class ReadSizeTests(unittest.TestCase):
    """
    L{private.set_read_size}: a plain TCP connection reads up to the size
    set at a time (Twisted's C{tcp.Connection.doRead} reads C{bufferSize}),
    then Twisted's 64 KiB again; TLS and anything else are left alone.
    """

    @defer.inlineCallbacks
    def first_read(self, size, reuse: bool = False, reads=None) -> int:
        """
        The length of a connection's first read, C{size} set (None: not;
        C{reuse} passed on), with 256 KiB or more waiting in its socket;
        the data of each read is appended to C{reads} if given.
        """
        kept = reads
        reads = []

        class Reader(protocol.Protocol):
            def connectionMade(self):
                self.transport.pauseProducing()
                self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 << 20)

            def dataReceived(self, data):
                reads.append(len(data))
                if kept is not None:
                    kept.append((data, bytes(data), self.transport))

        class Writer(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(os.urandom(2 << 20))

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Writer)
        )
        self.addCleanup(port.stopListening)
        reader = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(Reader)
        )
        self.addCleanup(reader.transport.loseConnection)

        def waiting() -> int:
            raw = fcntl.ioctl(reader.transport.fileno(), termios.FIONREAD, struct.pack("i", 0))
            return struct.unpack("i", raw)[0]

        yield until(lambda: waiting() >= 256 << 10, what="256 KiB to wait in the socket")
        if size is not None:
            private.set_read_size(reader.transport, size, reuse)
        reader.transport.resumeProducing()
        yield until(lambda: reads, what="a read")
        return reads[0]

    @defer.inlineCallbacks
    def test_reads_up_to_the_size_set(self):
        self.assertEqual((yield self.first_read(None)), 1 << 16)
        self.assertGreater((yield self.first_read(1 << 20)), 1 << 16)

    @defer.inlineCallbacks
    def test_reads_into_one_buffer(self):
        """
        With C{reuse}, every read goes into the same buffer of the
        connection's, handed on as a view of it; back to Twisted's own
        reads (new bytes) once the size is unset.
        """
        reads = []
        self.assertGreater((yield self.first_read(1 << 20, True, reads)), 1 << 16)
        yield until(lambda: len(reads) >= 2, what="a second read")
        (first, first_copy, transport), (second, second_copy, _) = reads[:2]
        self.assertIsInstance(first, memoryview)
        self.assertIs(first.obj, second.obj, "one buffer")
        self.assertEqual(bytes(second), second_copy)
        private.set_read_size(transport, None)
        self.assertNotIn("doRead", transport.__dict__)

    def test_back_to_twisteds_and_not_tls(self):
        from twisted.internet import interfaces, tcp
        from zope.interface import directlyProvides

        transport = tcp.Connection.__new__(tcp.Connection)
        private.set_read_size(transport, 1 << 22)
        self.assertEqual(transport.bufferSize, 1 << 22)
        private.set_read_size(transport, None)
        self.assertEqual(transport.bufferSize, 1 << 16)
        directlyProvides(transport, interfaces.ISSLTransport)
        private.set_read_size(transport, 1 << 22)
        self.assertEqual(transport.bufferSize, 1 << 16)
        private.set_read_size(object(), 1 << 22)  # nothing to do
