"""
Clients and workers check what the master sends as the master checks them
(L{cw.wire.checked.CheckedCommands}, L{cw.core.validation}): a malformed
command from an authenticated master ends the connection with one log line
naming the command and the field, and reaches neither the client's session
nor the worker.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from cw.client.session import ClientProtocol
from cw.core.records import encode_options
from cw.errors import BadCommand
from cw.wire import commands as P
from cw.worker.service import WorkerProtocol, _checked_registration


class Recorder:
    """A client session or a worker that records what reaches it."""

    on_started = None
    draining = False
    secret = None
    address = "master:5494"
    procs = 1
    versions = None
    capacity = None

    def __init__(self) -> None:
        self.calls: list[str] = []
        #: A worker's state: no results kept from an earlier master.
        self.state = SimpleNamespace(kept=None)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append(name)


class Raw(bytes):
    """An argument's bytes as sent, unencoded (a truncated batch)."""


def command_box(command: type[amp.Command], proto: amp.AMP, ask: bool = True, **arguments) -> amp.AmpBox:
    """
    The box of C{command} with C{arguments}: asking for an answer (C{ask}),
    or without C{_ask}, as commands that want none are sent (and take
    L{cw.wire.checked.CheckedCommands}' lean path).
    """
    raw = {name: value for name, value in arguments.items() if isinstance(value, Raw)}
    box = command.makeArguments({k: [] if k in raw else v for k, v in arguments.items()}, proto)
    for name, value in raw.items():
        box[name.encode()] = bytes(value)
    box[amp.COMMAND] = command.commandName
    if ask:
        box[amp.ASK] = b"1"
    return box


#: (role, what the log line must name, command, arguments).
JOB = P.Job(3, 1, b"payload")
CASES = [
    ("client", "unknown status", P.JobResults, {"results": [P.Result(1, 1, 77, b"")]}),
    ("client", "bytes must be", P.JobRoom, {"bytes": -1, "jobs": 1}),
    ("client", "jobs must be", P.JobRoom, {"bytes": 1, "jobs": -5}),
    ("client", "reason holds control characters", P.MasterStopping, {"reason": "bye\nCLIENT forged"}),
    ("client", "results", P.JobResults, {"results": Raw(b"\0" * 7)}),
    ("worker", "seq", P.RunJobs, {"jobs": [P.Job(3, 0, b"p")]}),
    ("worker", "client ids start at 1", P.RunJobs, {"jobs": [P.Job(0, 1, b"p")]}),
    (
        "worker",
        "timeout",
        P.RunJobs,
        {"jobs": [P.Job(3, 1, b"p", encode_options(timeout="soon"))]},
    ),
    ("worker", "jobs", P.RunJobs, {"jobs": Raw(b"\0" * 30)}),
    ("worker", "context", P.ClientContext, {"client": 3, "context": ["not", "a", "dict"]}),
    ("worker", "client must be", P.ClientContext, {"client": -1, "context": {"cwd": "/", "path": []}}),
    ("worker", "function key", P.DefineFunction, {"client": 3, "key": b"", "function": b"f"}),
    ("worker", "packages", P.Probe, {"packages": "numpy", "context": None}),
    ("worker", "client must be", P.ForgetClient, {"client": 0}),
    ("worker", "reason", P.MasterStopping, {"reason": "x" * 5000}),
]


class Later(amp.Command):
    """A command wanting no answer whose responder decides later."""

    requiresAnswer = False


class LateRefusal(ClientProtocol):
    @Later.responder
    def later(self):
        self.refusal = defer.Deferred()
        return self.refusal


class MasterCommandTests(unittest.TestCase):
    def connect(self, role: str) -> tuple[amp.AMP, StringTransport, Recorder]:
        peer = Recorder()
        proto = ClientProtocol(peer) if role == "client" else WorkerProtocol(peer)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.authenticated = True  # as after the handshake with the master
        return proto, transport, peer

    def test_malformed_commands(self):
        """Each malformed command: one warning naming it and the field, the connection dropped."""
        self.check_malformed(ask=True)

    def test_malformed_commands_wanting_no_answer(self):
        """The same, sent as commands that want no answer are (the lean path)."""
        self.check_malformed(ask=False)

    def check_malformed(self, ask: bool) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for role, what, command, arguments in CASES:
            del events[:]
            proto, transport, peer = self.connect(role)
            before = list(peer.calls)
            proto.ampBoxReceived(command_box(command, proto, ask, **arguments))
            name = command.commandName.decode()
            self.assertTrue(transport.disconnecting, f"{role} kept the connection after {name} ({what})")
            self.assertIn(f"sent a malformed {name!r}", proto.rejected or "", what)
            self.assertIn(what, proto.rejected, name)
            self.assertEqual(peer.calls, before, f"{name} reached the {role}")
            self.assertFalse([e for e in events if e.get("log_failure") is not None], (name, what))
            warnings = [e for e in events if "dropping the connection" in e.get("log_format", "")]
            self.assertEqual(len(warnings), 1, (name, what, events))
        self.flushLoggedErrors()

    def test_failing_responder_without_answer(self):
        """
        A command that wants no answer whose responder fails (a bug, not a
        malformed box): the failure is logged and the connection dropped,
        as AMP does with an error nobody handled.
        """
        proto, transport, peer = self.connect("client")

        def broken(results):
            raise ZeroDivisionError("a bug")

        peer.results_arrived = broken
        proto.ampBoxReceived(
            command_box(P.JobResults, proto, False, results=[P.Result(1, 1, P.Outcome.OK, b"")])
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_deferred_refusal_without_answer(self):
        """A responder whose Deferred fails with L{BadCommand} later drops the connection just the same."""
        proto = LateRefusal(Recorder())
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.authenticated = True
        proto.ampBoxReceived(command_box(Later, proto, False))
        self.assertFalse(transport.disconnecting)
        proto.refusal.errback(BadCommand("found out later"))
        self.assertTrue(transport.disconnecting)
        self.assertIn("sent a malformed 'Later': found out later", proto.rejected)

    def test_unauthenticated_command_without_answer(self):
        """Before the handshake, a command that wants no answer is refused like any other."""
        proto, transport, peer = self.connect("worker")
        proto.authenticated = False
        proto.ampBoxReceived(command_box(P.RunJobs, proto, False, jobs=[JOB]))
        self.assertTrue(transport.disconnecting)
        self.assertIn("before authenticating", proto.rejected)
        self.assertEqual(peer.calls, [])

    def test_boxes_amp_would_choke_on(self):
        """An answer to no question, an error without its code, a box that is no command: one line each."""
        for role in ("client", "worker"):
            for box, what in (
                (amp.AmpBox(_answer=b"99"), "answers no question"),
                (amp.AmpBox(_error=b"99"), "no error code"),
                (amp.AmpBox(hello=b"x"), "neither a command nor an answer"),
            ):
                proto, transport, peer = self.connect(role)
                proto.ampBoxReceived(box)
                self.assertTrue(transport.disconnecting, (role, what))
                self.assertIn(what, proto.rejected, role)

    def test_good_commands_pass(self):
        """The same commands, well formed, reach the session and the worker, asking an answer or not."""
        for ask in (True, False):
            proto, transport, peer = self.connect("client")
            proto.ampBoxReceived(command_box(P.JobRoom, proto, ask, bytes=10, jobs=1))
            proto.ampBoxReceived(
                command_box(P.JobResults, proto, ask, results=[P.Result(1, 1, P.Outcome.OK, b"")])
            )
            self.assertEqual(peer.calls, ["room", "results_arrived"])
            self.assertFalse(transport.disconnecting)
            proto, transport, peer = self.connect("worker")
            job = P.Job(3, 1, b"p", encode_options(timeout=5, allocation={"cpus": 1}))
            proto.ampBoxReceived(command_box(P.RunJobs, proto, ask, jobs=[job]))
            proto.ampBoxReceived(command_box(P.ForgetClient, proto, ask, client=3))
            self.assertEqual(peer.calls, ["enqueue", "forget_client"])
            self.assertFalse(transport.disconnecting)
            # An answer goes back only to the commands that asked for one.
            self.assertEqual(b"_answer" in transport.value(), ask)


class LeanSendTests(unittest.TestCase):
    """Commands that want no answer are sent by L{cw.wire.checked.CheckedCommands} itself."""

    def sent(self, proto: amp.AMP, command: type[amp.Command], **arguments) -> bytes:
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.authenticated = True
        transport.clear()  # what the protocol sends on connecting
        self.assertIsNone(proto.callRemote(command, **arguments))
        return transport.value()

    def test_same_bytes_as_amp(self):
        """The box on the wire is the one AMP's own C{callRemote} writes."""
        results = [P.Result(1, 1, P.Outcome.OK, b"x" * 70_000), P.Result(1, 2, P.Outcome.OK, b"")]
        for command, arguments in (
            (P.JobResults, {"results": results}),
            (P.RunJobs, {"jobs": [JOB]}),
            (P.JobRoom, {"bytes": 10, "jobs": 1}),
        ):
            lean = self.sent(WorkerProtocol(Recorder()), command, **arguments)
            plain = self.sent(amp.AMP(), command, **arguments)
            self.assertEqual(lean, plain, command)
            self.assertIn(command.commandName, lean)

    def test_bad_argument_name(self):
        """An argument the command does not take raises, as in AMP, and nothing is sent."""
        proto = WorkerProtocol(Recorder())
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.clear()
        with self.assertRaises(amp.InvalidSignature):
            proto.callRemote(P.JobResults, results=[], bogus=1)
        self.assertEqual(transport.value(), b"")

    def test_nothing_sent_once_lost(self):
        """After the connection is lost, a command that wants no answer sends nothing, without error."""
        proto = WorkerProtocol(Recorder())
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.clear()
        proto.failAllOutgoing(Failure(ConnectionLost()))
        self.assertIsNone(proto.callRemote(P.JobRoom, bytes=1, jobs=1))
        self.assertEqual(transport.value(), b"")


class RegistrationAnswerTests(unittest.SynchronousTestCase):
    def test_worker_registration_answer_checked(self):
        good = {"worker_id": 2, "max_payload": 1 << 30}
        self.assertEqual(_checked_registration(good), good)
        for bad in ({"worker_id": 0, "max_payload": 1}, {"worker_id": 1, "max_payload": -1}, {}):
            with self.assertRaises(BadCommand) as caught:
                _checked_registration(bad)
            self.assertIn("malformed answer to RegisterWorker", str(caught.exception))
