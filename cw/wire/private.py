"""
Every use cw makes of what Twisted and ampoule keep private, in one place,
each with the reason and what breaks if it changes.  setup.cfg bounds the
versions of both to the ones tested; a newer release that changes one of
these fails here (loudly) or in the tests named beside it.

One use cannot live here: L{cw.worker.pool.JobPool} overrides ampoule's
private C{ProcessPool._catchUp} (a subclass hook has to be a method of the
subclass); see the comment there.

Imports Twisted and ampoule only; part of the wire layer so that master,
worker and client may all use it.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable

from ampoule import main as ampoule_main
from twisted.internet import abstract, error, interfaces, main, process, stdio, tcp
from twisted.protocols import amp

from cw.system import unfilled_bytearray

#: Twisted's reader of a child process's pipe (C{twisted.internet.process}
#: is internal): cw reads the pipes faster (L{replace_pipe_reads}) and drains
#: those of an exited job process (L{cw.worker.containment.release_pipes}).
ProcessReader = process.ProcessReader


@functools.lru_cache(maxsize=1024)
def python_identifier(wire_name: bytes) -> str:
    """
    The key under which AMP puts the argument sent as C{wire_name} in a
    command's arguments.  Private C{amp._wireNameToPythonIdentifier}: AMP's
    own C{Argument.toBox}/C{fromBox} use it, and cw's chunked arguments
    (L{cw.wire.commands.Blob}) override those, so they must map names alike
    (cw.test.wire.test_protocol).  Remembered: the names are those of the
    commands' schemas (a few dozen), asked for on every box.
    """
    return amp._wireNameToPythonIdentifier(wire_name)


def responder_for(locator, name: bytes) -> tuple[type[amp.Command], Callable] | None:
    """
    The command class and the (unbound) responder function that
    C{locator}, an C{amp.CommandLocator}, answers command C{name} with, or
    None.  Private C{CommandLocator._commandDispatch}, where
    C{locateResponder} finds them too: cw's lean path for commands that
    want no answer (L{cw.wire.checked.CheckedCommands}) calls the responder
    itself (cw.test.wire.test_checked).
    """
    return locator._commandDispatch.get(name)


def serialized_responder(locator, function: Callable, command: type[amp.Command]) -> Callable:
    """
    What C{locator.locateResponder} returns for C{command} answered by
    C{function} (called with the parsed arguments): AMP's wrapping that
    parses the box, calls it and serializes its answer or its error.
    Private C{CommandLocator._wrapWithSerialization}: cw's lean path for
    answered commands (L{cw.wire.checked.LeanAnswers}) falls back on it with
    an outcome it already has (cw.test.wire.test_checked).
    """
    return locator._wrapWithSerialization(function, command)


def send_command(proto: amp.AMP, name: bytes, box: amp.AmpBox):
    """
    Send command C{name} with its arguments in C{box} (an C{amp.AmpBox},
    completed here with C{_command} and C{_ask}); a Deferred firing with the
    answer's box, or failing with C{amp.RemoteAmpError}.  Private
    C{BoxDispatcher._sendBoxCommand}, which AMP's C{callRemote} calls with
    the box it builds: cw's lean calls (L{cw.wire.checked.LeanCalls})
    build theirs (cw.test.wire.test_checked).
    """
    return proto._sendBoxCommand(name, box, True)


def last_tag(proto: amp.AMP) -> bytes:
    """
    The C{_ask} tag of the last question C{proto} sent (its C{callRemote}
    of a command that wants an answer): private C{BoxDispatcher._counter},
    from which C{_nextTag} makes tags, so that the answer can be told
    before it is whole (L{cw.wire.forwarding}).
    """
    return b"%x" % (proto._counter,)


def emit(proto: amp.AMP, box: amp.AmpBox) -> None:
    """
    Send C{box} (an answer, or a command without C{_ask}) to C{proto}'s
    peer as AMP does: through the box's own C{_sendTo} (private), so that
    a C{QuitBox} (ampoule's C{Shutdown} answer) closes the connection after
    it; an answer nobody can receive any more is dropped, as AMP's
    C{_safeEmit} drops it (cw.test.wire.test_checked).
    """
    try:
        box._sendTo(proto.boxSender)
    except (amp.ProtocolSwitched, error.ConnectionLost):
        pass


def connection_failed(proto: amp.AMP) -> bool:
    """
    Whether C{proto}'s connection was lost, so that AMP sends nothing more
    (private C{BoxDispatcher._failAllReason}, set by C{failAllOutgoing}):
    a lean send (L{cw.wire.checked.CheckedCommands.callRemote}) then sends
    nothing, as C{callRemote} does (cw.test.wire.test_checked).
    """
    return proto._failAllReason is not None


# AMP's box parser (C{amp.BinaryBoxProtocol}) keeps its state in private
# attributes.  cw's incoming-box mixins (L{cw.wire.streaming.ChunkReceiver},
# L{cw.wire.auth.AuthGate}) override its public-looking C{proto_key} and
# C{proto_value} states, and must read and reset that state to do so; they
# do it through these functions, one call per key or value (no copies)
# (cw.test.wire.test_streaming, cw.test.wire.test_auth).


def current_key(proto) -> bytes | None:
    """
    The key whose value C{proto} (an C{amp.BinaryBoxProtocol}) is reading:
    private C{_currentKey}, set by C{proto_key}, read by C{proto_value}.
    """
    return proto._currentKey


def current_box(proto) -> dict:
    """
    The box C{proto} is filling, key by key: private C{_currentBox}; cw
    joins chunked values in it, and finishes them when the box ends.
    """
    return proto._currentBox


def expect_key(proto) -> str:
    """
    Take a value out of the box being read (cw's chunks and MACs): reset
    C{proto}'s parser to read a key next, as C{proto_value} does after
    storing a value (private C{_currentKey} cleared and C{MAX_LENGTH} set
    back to private C{_MAX_KEY_LENGTH}); return the next state, C{"key"},
    for C{proto_value} to return.
    """
    proto._currentKey = None
    proto.MAX_LENGTH = proto._MAX_KEY_LENGTH
    return "key"


def data_arrived(proto) -> None:
    """
    What C{amp.BinaryBoxProtocol.dataReceived} does before it parses, for
    a parser that replaces its parsing (L{cw.wire.streaming.ChunkReceiver}):
    clear private C{_justStartedTLS}, which tells C{connectionLost} that a
    connection closed before any byte came after STARTTLS
    (cw.test.wire.test_streaming).
    """
    proto._justStartedTLS = False


def tls_starting(proto) -> bool:
    """
    Whether C{proto} (an C{amp.AMP}) is starting TLS (private
    C{_startingTLSBuffer} set): AMP then holds outgoing boxes in that buffer
    until the handshake starts, so a streamed box must not bypass it.
    """
    return proto._startingTLSBuffer is not None


#: Private Twisted and ampoule names that only this module may use
#: (cw.test.wire.test_private scans cw's source for them).  C{_catchUp} is
#: the one exception, in L{cw.worker.pool} (see the module docstring).
PRIVATE_NAMES = (
    "_currentKey",
    "_currentBox",
    "_MAX_KEY_LENGTH",
    "_startingTLSBuffer",
    "_justStartedTLS",
    "_wireNameToPythonIdentifier",
    "_sslContextFactory",
    "_outstandingRequests",
    "_answerReceived",
    "_errorReceived",
    "_catchUp",
    "BOOTSTRAP",
    "_tempDataBuffer",
    "_disconnectSelectable",
    "_writer",
    "_commandDispatch",
    "_failAllReason",
    "_wrapWithSerialization",
    "_sendBoxCommand",
    "_sendTo",
    "TO_CHILD",
)


def ssl_context_factory(endpoint):
    """
    The context factory of an C{ssl:} server endpoint made by
    C{serverFromString}.  Private C{SSL4ServerEndpoint._sslContextFactory}:
    the description's parser offers no way to require client certificates,
    so cw reads the factory it built (and L{set_ssl_context_factory}
    replaces it) (cw.test.wire.test_address).
    """
    return endpoint._sslContextFactory


def set_ssl_context_factory(endpoint, factory) -> None:
    """Give an C{ssl:} server endpoint another context factory (see L{ssl_context_factory})."""
    endpoint._sslContextFactory = factory


class CheckedAnswers:
    """
    Mixin for L{amp.AMP} subclasses (listed before it) that receive boxes
    from peers they do not trust to be bug-free: a box that answers no
    question this side asked, or that is neither a command nor an answer,
    calls C{self.malformed_box(why)} (which should drop the connection)
    instead of raising deep inside AMP.

    Overrides AMP's private C{BoxDispatcher._answerReceived} and
    C{_errorReceived}, and reads its private C{_outstandingRequests}: AMP
    pops the answered question from that dict without checking, so an
    answer with an unknown tag (or an error box without its code or
    description) raises C{KeyError} and ends the connection with an
    "Unhandled Error" traceback in the log (cw.test.master.test_limits,
    ValidationTests).  C{ampBoxReceived} is public; it raises
    C{NoEmptyBoxes} for a box without C{_answer}, C{_error} or C{_ask}.
    """

    def malformed_box(self, why: str) -> None:
        raise NotImplementedError

    def _unasked(self, tag: bytes) -> bool:
        if tag in self._outstandingRequests:
            return False
        self.malformed_box(f"sent a malformed answer: its tag {tag!r:.40} answers no question asked")
        return True

    def ampBoxReceived(self, box) -> None:
        if amp.ANSWER not in box and amp.ERROR not in box and amp.COMMAND not in box:
            self.malformed_box("sent a malformed box: neither a command nor an answer")
            return
        super().ampBoxReceived(box)

    def _answerReceived(self, box) -> None:
        if not self._unasked(box[amp.ANSWER]):
            super()._answerReceived(box)

    def _errorReceived(self, box) -> None:
        if amp.ERROR_CODE not in box or amp.ERROR_DESCRIPTION not in box:
            self.malformed_box("sent a malformed error answer: no error code or description")
        elif not self._unasked(box[amp.ERROR]):
            super()._errorReceived(box)


def command_named(protocol: amp.AMP, name: bytes) -> type[amp.Command]:
    """
    The command class C{protocol} answers under C{name}.  Private
    C{CommandLocator._commandDispatch}: AMP offers the responder for a name,
    not its command, and L{cw.wire.checked.CheckedCommands} reparses a bad
    box's arguments one by one to name the one that is malformed
    (cw.test.master.test_limits, ValidationTests).
    """
    return protocol._commandDispatch[name][0]


def replace_pipe_reads(do_read: Callable) -> None:
    """
    Make every child-process pipe of this process read with C{do_read}
    (an C{IReadDescriptor.doRead}).  C{ProcessReader.doRead} is internal and
    reads 8 KiB at a time; cw reads its job pipes in larger pieces
    (L{cw.worker.pipes.bulk_pipe_reads}).  Process-wide, by design: only
    worker and job processes call it.
    """
    ProcessReader.doRead = do_read


#: Edits of ampoule's child bootstrap (C{ampoule.main.BOOTSTRAP}, source text
#: that ampoule runs with C{python -c}): Twisted's logging in a job process
#: at warn, the job's stdout/stderr left alone so what a job prints
#: reaches the worker, and no signal handlers from the reactor (a job
#: process keeps the SIGTERM handler of cw.worker.containment).
_BOOTSTRAP_EDITS = (
    ("LogLevel.info", "LogLevel.warn"),
    ("beginLoggingTo([filteringObserver])", "beginLoggingTo([filteringObserver], redirectStandardIO=False)"),
    ("reactor.run()", "reactor.run(installSignalHandlers=False)"),
)


def job_bootstrap(prefix: str) -> str:
    """
    ampoule's bootstrap for a job process, edited (see C{_BOOTSTRAP_EDITS}),
    after C{prefix} (source run first).  Raises C{RuntimeError} if ampoule's
    text no longer holds what is edited, rather than silently running
    children that log at info and swallow the job's output.
    """
    text = ampoule_main.BOOTSTRAP
    for old, new in _BOOTSTRAP_EDITS:
        if old not in text:
            raise RuntimeError(
                f"ampoule's child bootstrap no longer contains {old!r}: this ampoule version is"
                " not one cw supports (see setup.cfg)"
            )
        text = text.replace(old, new)
    return prefix + text


def push(transport) -> None:
    """
    Write what C{transport} has buffered now, rather than when the
    reactor next finds its descriptor writable (one more turn of the
    reactor, an C{epoll_wait}, per hop of a lone job's round trip).  Call
    after the writes of one burst (a batch flush, a dispatch), not after
    every write: writes made before it share one system call.

    C{transport} may be a TCP connection, a wrapper over one (TLS, whose
    C{transport} is the connection), a child process (its stdin pipes,
    ampoule's connector or Twisted's process) or standard I/O (a job
    process's pipe to its worker).  Private: Twisted's
    C{FileDescriptor.doWrite}, its write buffers and the reactor's
    C{_disconnectSelectable}, which handles a write that finds the
    connection lost as the reactor itself does (cw.test.wire.test_push).
    """
    for _ in range(4):
        if transport is None or isinstance(transport, abstract.FileDescriptor):
            break
        pipes = getattr(transport, "pipes", None)
        if isinstance(pipes, dict):  # a Twisted process: its stdin pipes
            for pipe in list(pipes.values()):
                if isinstance(pipe, process.ProcessWriter):
                    _push_descriptor(pipe)
            return
        writer = getattr(transport, "_writer", None)  # StandardIO
        if isinstance(writer, abstract.FileDescriptor):
            transport = writer
            break
        transport = getattr(transport, "transport", None)
    if isinstance(transport, abstract.FileDescriptor):
        _push_descriptor(transport)


def _push_descriptor(descriptor: abstract.FileDescriptor) -> None:
    if not (descriptor._tempDataBuffer or descriptor.dataBuffer):
        return
    if not descriptor.connected or descriptor.disconnecting or descriptor.disconnected:
        return
    why = descriptor.doWrite()
    if why:
        descriptor.reactor._disconnectSelectable(descriptor, why, False)


def can_write_now(transport) -> bool:
    """
    Whether L{write_now} may write to C{transport} from a thread other than
    the reactor's: a plain TCP connection (no TLS: its bytes go through
    OpenSSL's buffers, owned by the reactor thread), connected, with no
    producer and nothing buffered.  The caller must hold a lock that every
    writer to C{transport} holds while it adds to the transport's buffers
    (the reactor only ever drains them without it, which cannot make
    buffered bytes look sent).  Private: C{FileDescriptor._tempDataBuffer},
    read before C{dataBuffer} (C{doWrite} moves bytes from the former to the
    latter, so this order never sees both empty while bytes wait)
    (cw.test.wire.test_push).
    """
    if not isinstance(transport, tcp.Connection) or interfaces.ISSLTransport.providedBy(transport):
        return False
    if not transport.connected or transport.disconnecting or transport.producer is not None:
        return False
    return not transport._tempDataBuffer and not transport.dataBuffer


def write_now(transport, data: bytes) -> int:
    """
    Write C{data} to C{transport}'s socket at once, from any thread, where
    L{can_write_now} allows it (checked first, under the same lock); return
    how many bytes the socket took (0 when none, or when it cannot be
    written here): the caller hands the rest to the reactor thread, ahead
    of anything written after it.  Saves a lone job's submit the wake-up of
    the reactor thread (issue 18).
    """
    if not can_write_now(transport):
        return 0
    try:
        return transport.socket.send(data)
    except OSError:
        return 0  # full (EAGAIN) or broken: the reactor thread writes it, or finds the connection lost


def _own_descriptor(transport) -> abstract.FileDescriptor | None:
    """
    The descriptor that C{transport.write} itself writes to, where that is
    all C{write} does: a plain TCP connection (not TLS), ampoule's
    connector to a job process (its pipe to the child, C{TO_CHILD}) whose
    C{write} is ampoule's or whose C{passes_writes()} says it passes this
    one on unchanged, or a job process's standard I/O (its writer).  None
    for anything else (TLS, protocol wrappers, which may do more than write).
    """
    if isinstance(transport, tcp.Connection):
        return None if interfaces.ISSLTransport.providedBy(transport) else transport
    if isinstance(transport, ampoule_main.AMPConnector):
        passes = getattr(transport, "passes_writes", None)
        if type(transport).write is not ampoule_main.AMPConnector.write and not (passes and passes()):
            return None
        pipes = getattr(transport.transport, "pipes", None)
        pipe = pipes.get(ampoule_main.TO_CHILD) if isinstance(pipes, dict) else None
        return pipe if isinstance(pipe, process.ProcessWriter) else None
    if isinstance(transport, stdio.StandardIO):
        writer = transport._writer
        return writer if isinstance(writer, abstract.FileDescriptor) else None
    return None


def write_through(transport, data: bytes) -> bool:
    """
    Write C{data} (a whole box) to C{transport} at once, in the reactor
    thread, where nothing is buffered ahead of it: straight to the socket or
    pipe, rather than into Twisted's buffer and out at L{push} or the
    reactor's next turn, which costs two C{epoll_ctl} (four on a pipe to a
    job process) and Twisted's write path; a lone job's round trip writes
    five boxes (issue 18).  What the descriptor does not take is buffered
    behind as usual.  Return False, having written nothing, where this does
    not apply (see L{_own_descriptor}; closing, a producer registered, bytes
    buffered, or the write failed): the caller then writes C{data} as
    usual, and Twisted handles a lost connection as always.  Private:
    C{FileDescriptor}'s buffers (as L{can_write_now}), ampoule's
    C{AMPConnector} and C{TO_CHILD}, C{StandardIO._writer}
    (cw.test.wire.test_private).
    """
    descriptor = _own_descriptor(transport)
    if descriptor is None:
        return False
    if not descriptor.connected or descriptor.disconnecting or descriptor.producer is not None:
        return False
    if descriptor._tempDataBuffer or descriptor.dataBuffer:
        return False
    try:
        if isinstance(descriptor, tcp.Connection):
            written = descriptor.socket.send(data)
        else:
            written = os.write(descriptor.fileno(), data)
    except OSError:
        return False  # full (EAGAIN) or broken: the usual path writes it, or finds the loss
    if written < len(data):
        descriptor.write(data[written:])
    return True


def set_read_size(transport, size: int | None, reuse: bool | bytearray = False, plan=None) -> None:
    """
    Make C{transport}, if a plain TCP connection (not TLS), read up to
    C{size} bytes at a time (None: back to Twisted's 64 KiB): a receiver
    in the middle of a big value (L{cw.wire.streaming.ChunkReceiver})
    takes it in fewer, larger reads, each one system call, one turn of
    the reactor and one pass through the protocols' C{dataReceived}.
    C{tcp.Connection.doRead} reads C{self.bufferSize} bytes (as its
    docstring says; the attribute is C{FileDescriptor}'s, in no
    interface) (cw.test.wire.test_private).

    With C{reuse}, the reads go into one buffer of the connection's
    (C{recv_into}) instead of a new C{bytes} each: the protocol's
    C{dataReceived} then gets a C{memoryview} of it, valid only during
    the call (the next read overwrites it), which it must copy whatever
    it keeps of.  C{reuse} may be that buffer (of C{size} bytes or more),
    shared by connections of one process (their reads never overlap: each
    read is parsed before the reactor makes another); else the connection
    keeps one of its own.  A new C{bytes} of megabytes is fresh memory, which the
    kernel maps and clears page by page as the read fills it and unmaps
    once it is freed: that cost as much as the copy it holds.  The
    transport's C{doRead} is replaced on the instance (the reactor calls
    it there) by L{_read_into}, which ends as Twisted's does, through
    private C{_dataReceived}.

    With C{reuse}, C{plan} (if given) is asked before each read where the
    bytes should go instead: None (into the buffer, as above), or a plan
    (L{cw.wire.streaming.ChunkReceiver.read_plan}) whose C{views} the
    read fills in order (C{recvmsg_into}) and whose C{received(length)}
    makes what C{dataReceived} is given in place of the bytes.
    """
    if not isinstance(transport, tcp.Connection) or interfaces.ISSLTransport.providedBy(transport):
        return
    if size is None:
        transport.__dict__.pop("bufferSize", None)
        transport.__dict__.pop("doRead", None)
        return
    transport.bufferSize = size
    if isinstance(reuse, bytearray) and len(reuse) >= size:
        buffer = reuse
    elif reuse:
        buffer = transport.__dict__.get("_cw_reads")
        if buffer is None or len(buffer) < size:
            buffer = transport._cw_reads = unfilled_bytearray(size)
    if reuse:
        transport.doRead = functools.partial(_read_into, transport, memoryview(buffer)[:size], plan)


def _read_into(transport, buffer: memoryview, plan=None):
    """C{tcp.Connection.doRead}, reading into C{buffer}, or where C{plan} says (see L{set_read_size})."""
    planned = plan() if plan is not None else None
    try:
        if planned is None:
            length = transport.socket.recv_into(buffer)
        else:
            length = transport.socket.recvmsg_into(planned.views)[0]
    except OSError as e:
        if planned is not None:
            planned.received(0)  # lets go of its views
        if e.args[0] == errno.EWOULDBLOCK:
            return None
        return main.CONNECTION_LOST
    if planned is None:
        return transport._dataReceived(buffer[:length])
    data = planned.received(length)
    return transport._dataReceived(data if length else b"")


#: Buffers one C{sendmsg} call may take (Linux's C{UIO_MAXIOV}; more fail
#: with C{EMSGSIZE}).
SEND_BUFFERS = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def sending_socket(transport):
    """
    The socket of C{transport} if its producer (a pull producer, asked for
    more) may write to it directly, bypassing Twisted's write buffer: a
    plain TCP connection (not TLS, whose bytes go through OpenSSL),
    connected, not closing, with nothing buffered (so no byte overtakes
    another).  None otherwise: the producer then writes to the transport
    as usual.  Private: C{FileDescriptor._tempDataBuffer} and
    C{dataBuffer} (as L{write_through}) (cw.test.wire.test_sendmsg).
    """
    if not isinstance(transport, tcp.Connection) or interfaces.ISSLTransport.providedBy(transport):
        return None
    if not transport.connected or transport.disconnecting:
        return None
    if transport._tempDataBuffer or transport.dataBuffer:
        return None
    return transport.socket


def send_buffers(sock, buffers: list) -> int:
    """
    Send C{buffers} (bytes-like, at most L{SEND_BUFFERS}) as one byte
    string, in one system call, without joining them (C{sendmsg}'s
    scatter-gather); the number of bytes the socket took (0 when full).
    Raises C{OSError} if the connection is broken: the caller then writes
    what is left to the transport, which finds the loss as usual.
    """
    try:
        return sock.sendmsg(buffers)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as why:
        if why.errno == errno.ENOBUFS:
            return 0
        raise


def resume_when_writable(transport) -> None:
    """
    Have C{transport} (a TCP connection; see L{sending_socket}) ask its
    registered pull producer for more (C{resumeProducing}) once its socket
    is writable, the producer having left bytes unsent rather than in the
    transport's buffer.  Private behaviour: C{FileDescriptor.doWrite}, run
    when the socket is writable, finds its buffers empty, sends nothing,
    stops watching for writability and asks the pull producer for more,
    exactly as when it has just sent the last buffered byte
    (cw.test.wire.test_sendmsg).
    """
    transport.startWriting()
