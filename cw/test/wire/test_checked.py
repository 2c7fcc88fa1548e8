"""
Clients and workers check what the master sends as the master checks them
(L{cw.wire.checked.CheckedCommands}, L{cw.core.validation}): a malformed
command from an authenticated master ends the connection with one log line
naming the command and the field, and reaches neither the client's session
nor the worker.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
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


def command_box(command: type[amp.Command], proto: amp.AMP, **arguments) -> amp.AmpBox:
    raw = {name: value for name, value in arguments.items() if isinstance(value, Raw)}
    box = command.makeArguments({k: [] if k in raw else v for k, v in arguments.items()}, proto)
    for name, value in raw.items():
        box[name.encode()] = bytes(value)
    box[amp.COMMAND] = command.commandName
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
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for role, what, command, arguments in CASES:
            del events[:]
            proto, transport, peer = self.connect(role)
            before = list(peer.calls)
            proto.ampBoxReceived(command_box(command, proto, **arguments))
            name = command.commandName.decode()
            self.assertTrue(transport.disconnecting, f"{role} kept the connection after {name} ({what})")
            self.assertIn(f"sent a malformed {name!r}", proto.rejected or "", what)
            self.assertIn(what, proto.rejected, name)
            self.assertEqual(peer.calls, before, f"{name} reached the {role}")
            self.assertFalse([e for e in events if e.get("log_failure") is not None], (name, what))
            warnings = [e for e in events if "dropping the connection" in e.get("log_format", "")]
            self.assertEqual(len(warnings), 1, (name, what, events))
        self.flushLoggedErrors()

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
        """The same commands, well formed, reach the session and the worker."""
        proto, transport, peer = self.connect("client")
        proto.ampBoxReceived(command_box(P.JobRoom, proto, bytes=10, jobs=1))
        proto.ampBoxReceived(command_box(P.JobResults, proto, results=[P.Result(1, 1, P.Outcome.OK, b"")]))
        self.assertEqual(peer.calls, ["room", "results_arrived"])
        self.assertFalse(transport.disconnecting)
        proto, transport, peer = self.connect("worker")
        job = P.Job(3, 1, b"p", encode_options(timeout=5, allocation={"cpus": 1}))
        proto.ampBoxReceived(command_box(P.RunJobs, proto, jobs=[job]))
        proto.ampBoxReceived(command_box(P.ForgetClient, proto, client=3))
        self.assertEqual(peer.calls, ["enqueue", "forget_client"])
        self.assertFalse(transport.disconnecting)


class RegistrationAnswerTests(unittest.SynchronousTestCase):
    def test_worker_registration_answer_checked(self):
        good = {"worker_id": 2, "max_payload": 1 << 30}
        self.assertEqual(_checked_registration(good), good)
        for bad in ({"worker_id": 0, "max_payload": 1}, {"worker_id": 1, "max_payload": -1}, {}):
            with self.assertRaises(BadCommand) as caught:
                _checked_registration(bad)
            self.assertIn("malformed answer to RegisterWorker", str(caught.exception))
