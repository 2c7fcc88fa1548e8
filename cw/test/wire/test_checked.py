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
from cw.wire.checked import LeanAnswers, LeanCalls
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
            self.assertEqual(peer.calls, ["room", "results_arrived", "took"])
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


class Refused(Exception):
    """A known error of L{Ask}."""


class Ask(amp.Command):
    """A command asking an answer, answered in all the ways a responder can."""

    arguments = [(b"how", amp.Unicode())]
    response = [(b"said", amp.Unicode())]
    errors = {Refused: b"REFUSED"}


class Quit(amp.Command):
    """A command whose answer ends the connection (as ampoule's C{Shutdown})."""

    responseType = amp.QuitBox


class Responders(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.called = 0
        self.later: defer.Deferred = defer.Deferred()

    @Ask.responder
    def ask(self, how):
        self.called += 1
        if how == "refuse":
            raise Refused("no")
        if how == "break":
            raise ZeroDivisionError("a bug")
        if how == "later":
            return self.later
        if how == "unserializable":
            return {"said": 5}
        return {"said": how.upper()}

    @Quit.responder
    def quit(self):
        return {}


class Lean(LeanAnswers, Responders):
    pass


class LeanAnswersTests(unittest.TestCase):
    """L{LeanAnswers} answers as AMP does, in every case, calling the responder once."""

    def answer(self, proto: amp.AMP, box: amp.AmpBox) -> bytes:
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.ampBoxReceived(amp.AmpBox(box))
        if proto.later.callbacks:
            proto.later.callback({"said": "LATE"})
        called = proto.called
        self.assertEqual(called, 1 if b"how" in box else 0)
        # And the next box is answered on its own (nothing of this one left over).
        proto.ampBoxReceived(amp.AmpBox({amp.COMMAND: b"Ask", amp.ASK: b"8", b"how": b"next"}))
        self.assertIn(b"NEXT", transport.value())
        proto.ampBoxReceived(amp.AmpBox({amp.COMMAND: b"Ask", b"how": b"quiet"}))  # no answer wanted
        self.assertEqual(proto.called, called + 2)
        return transport.value()

    def test_same_answers_as_amp(self):
        for how in ("fine", "refuse", "break", "later", "unserializable", None):
            box = {amp.COMMAND: b"Ask", amp.ASK: b"7"}
            if how is not None:
                box[b"how"] = how.encode()
            lean = self.answer(Lean(), box)
            plain = self.answer(Responders(), box)
            self.assertEqual(lean, plain, how)
            self.assertIn(b"_answer" if how in ("fine", "later") else b"_error", lean, how)
        # The bug, the unserializable answer and the missing argument, logged once each way.
        self.flushLoggedErrors()

    def test_answer_that_ends_the_connection(self):
        """An answer that is a C{QuitBox} is sent, then the connection closed, as AMP does."""
        for proto in (Lean(), Responders()):
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.ampBoxReceived(amp.AmpBox({amp.COMMAND: b"Quit", amp.ASK: b"1"}))
            self.assertIn(b"_answer", transport.value())
            self.assertTrue(transport.disconnecting, proto)


class LeanCaller(LeanCalls, amp.AMP):
    pass


class LeanCallsTests(unittest.TestCase):
    """A call that asks an answer, sent by L{LeanCalls}: same box, same answer, same errors as AMP's."""

    def call(self, proto: amp.AMP, answer: dict):
        transport = StringTransport()
        proto.makeConnection(transport)
        outcome: list = []
        proto.callRemote(Ask, how="hi").addBoth(outcome.append)
        sent = transport.value()
        proto.ampBoxReceived(amp.AmpBox({**answer, (amp.ANSWER if b"said" in answer else amp.ERROR): b"1"}))
        return sent, outcome[0]

    def test_same_as_amp(self):
        for answer in (
            {b"said": b"HI"},
            {amp.ERROR_CODE: b"REFUSED", amp.ERROR_DESCRIPTION: b"no"},
            {amp.ERROR_CODE: b"OTHER", amp.ERROR_DESCRIPTION: b"what"},
        ):
            lean_sent, lean = self.call(LeanCaller(), answer)
            plain_sent, plain = self.call(amp.AMP(), answer)
            self.assertEqual(lean_sent, plain_sent)
            if isinstance(plain, dict):
                self.assertEqual(lean, plain)
                self.assertEqual(lean, {"said": "HI"})
            else:
                self.assertEqual(type(lean.value), type(plain.value), answer)
                self.assertEqual(str(lean.value), str(plain.value))
        self.assertIsInstance(
            self.call(LeanCaller(), {amp.ERROR_CODE: b"REFUSED", amp.ERROR_DESCRIPTION: b"no"})[1].value,
            Refused,
        )

    def test_arguments_amp_refuses(self):
        """A missing argument fails the call as AMP fails it; an unknown one raises as AMP raises."""
        proto = LeanCaller()
        proto.makeConnection(StringTransport())
        self.failureResultOf(proto.callRemote(Ask), amp.InvalidSignature)
        with self.assertRaises(amp.InvalidSignature):
            proto.callRemote(Ask, how="x", bogus=1)
