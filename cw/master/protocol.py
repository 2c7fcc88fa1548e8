"""
The master's protocol adapter: one L{MasterProtocol} per connection, from a
client or a worker.  It checks each command's fields (L{cw.core.validation}),
turns commands into calls on the L{cw.master.service.Master} it is given, and
sends what the master decides.  It holds no decisions of its own.

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
Within cw.master it imports nothing: the service imports it (a contract in pyproject.toml).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.protocols import amp

from cw.core.validation import (
    MAX_AWAIT,
    MAX_PROBE_TIMEOUT,
    MAX_SLOTS,
    check_capacity,
    check_context,
    check_function_key,
    check_handover,
    check_jobs,
    check_outputs,
    check_packages,
    check_peer,
    check_probe_context,
    check_range,
    check_results,
    check_session,
    check_text,
    check_versions,
)
from cw.errors import BadCommand
from cw.wire import commands as P
from cw.wire.address import enable_keepalive
from cw.wire.auth import AuthGate, MasterAuth
from cw.wire.batching import Outbox
from cw.wire.checked import CheckedCommands
from cw.wire.forwarding import ForwardingReceiver
from cw.wire.liveness import SignsOfLife
from cw.wire.private import push
from cw.wire.streaming import ChunkReceiver, StreamingSender

#: The L{cw.master.service.Master} a connection serves.  Passed in, never
#: imported: the service imports this module, not the other way round.
Master = Any


def transport_backlog(transport) -> int:
    """
    Bytes written to C{transport} that it has not yet handed to the kernel
    (Twisted's write buffers, of this transport and of any it wraps, as a
    TLS transport wraps TCP).  0 for a transport without such buffers.
    """
    total = 0
    for _ in range(4):
        if transport is None:
            break
        buffer = getattr(transport, "dataBuffer", None)
        if buffer is not None:
            total += len(buffer) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
        transport = getattr(transport, "transport", None)
    return total


class MasterProtocol(
    SignsOfLife,
    StreamingSender,
    AuthGate,
    MasterAuth,
    ForwardingReceiver,
    ChunkReceiver,
    CheckedCommands,
    amp.AMP,
):
    """
    One connection to the master, from a client or a worker.  The peer
    first authenticates (L{cw.wire.auth}); which kind of peer it is becomes known
    with its next command (L{P.RegisterClient} or L{P.RegisterWorker}).
    Commands out of that order close the connection.
    """

    open_commands = MasterAuth.open_commands

    def __init__(self, master: Master) -> None:
        super().__init__()
        self.master = master
        self.secret = master.secret
        self.wrong_secrets = master.wrong_secrets
        self.auth_clock = master.clock
        self.max_box_bytes = P.box_limit(master.max_payload)
        self.spare_buffers = master.spare_buffers
        if self.secret is None:
            self.mark_authenticated()
        self.role: str | None = None
        self.launch: str | None = None
        self.peer_id = 0
        self.peer_name = "?"
        #: A client's session name (L{P.RegisterClient}), once registered.
        self.session: str | None = None
        self.outbox: Outbox | None = None
        #: Why the master dropped this worker, for the log and error reports.
        self.lost_how: str | None = None
        #: What the peer reported at registration (L{cw.core.versions}), if anything.
        self.versions: dict | None = None
        #: The machine the peer runs on (L{cw.system.machine_identity}), if it said.
        self.machine: str | None = None
        #: Fires once the connection has closed.
        self.closed: defer.Deferred = defer.Deferred()
        #: Bytes handed to the transport or sent to its socket so far (see L{sent_bytes}).
        self.written_bytes = 0
        #: A client's arguments asked for (L{P.FetchPayload}), by the tag of
        #: the question: what L{Master.relay_fetched} needs to forward one.
        self.fetches: dict[bytes, tuple] = {}
        #: How many times the master's heap had been frozen when this peer
        #: registered (L{cw.master.heap.HeapKeeper.epoch}).
        self.heap_epoch = 0

    def connectionMade(self):
        super().connectionMade()
        # Heartbeats notice a peer that hangs; keepalive, one that vanished
        # while heartbeats are off.
        enable_keepalive(self.transport)
        self._count_writes()
        if not self.authenticated:
            self.auth_timeout = self.master.auth_timeout
            self.master.admit(self)
            self.start_auth_timer(self.master.clock)

    def _count_writes(self) -> None:
        """Count the bytes written to the transport, so that what the peer read can be told."""
        transport = self.transport
        write, write_sequence = transport.write, transport.writeSequence

        def counted_write(data) -> None:
            self.written_bytes += len(data)
            write(data)

        def counted_sequence(pieces) -> None:
            pieces = list(pieces)
            self.written_bytes += sum(len(piece) for piece in pieces)
            write_sequence(pieces)

        transport.write, transport.writeSequence = counted_write, counted_sequence

    def unsent_bytes(self) -> int:
        """Bytes towards this peer still in the master: buffered, or in boxes being streamed."""
        return transport_backlog(self.transport) + self.outgoing_bytes

    def sent_bytes(self) -> int:
        """
        Bytes towards this peer that the kernel has taken, in all: those
        written (L{written_bytes}, with those sent straight to the socket)
        less those still in Twisted's buffers.  The peer's reading
        progress: it never goes back (boxes queued and not yet written,
        L{outgoing_bytes}, were never counted as written).
        """
        return self.written_bytes - transport_backlog(self.transport)

    def stop_reading(self) -> None:
        """
        Flow control: read nothing more from this peer, and parse nothing
        more of what has arrived, until L{resume_reading}.
        """
        self.paused = True
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """
        Undo L{stop_reading}: read again, and parse what arrived meanwhile
        on the reactor's next turn (not from within the caller, which may be
        in the middle of a dispatch).
        """
        self.paused = False
        self.transport.resumeProducing()
        self.master.clock.callLater(0, self._parse_buffered)

    def dataReceived(self, data):
        # One dispatch for all the boxes of one read (L{Master.read}).
        self.master.read(super().dataReceived, data)

    def _parse_buffered(self) -> None:
        if not self.closed.called and not self.paused:
            self.dataReceived(b"")

    def stream_sent(self, size: int) -> None:
        self.written_bytes += size  # sent past the transport's write (L{_count_writes})

    def stream_progress(self) -> None:
        if self.role == "client":
            self.master.watch_output(self)

    def mark_authenticated(self) -> None:
        super().mark_authenticated()
        if self.transport is not None:
            self.master.pending.pop(self, None)

    def _claim(self, role: str) -> None:
        """
        Check that a peer registers once, in the role it authenticated as.
        C{self.role} is set once registration has succeeded, so a peer
        refused on the way is never treated as registered.
        """
        if self.role is not None:
            raise BadCommand("registered a second time")
        if self._challenge is not None and self._challenge[0] != role:
            raise BadCommand(f"authenticated as a {self._challenge[0]!r} but registered as a {role}")

    def _check_version(self, version: int) -> None:
        if version != P.PROTOCOL_VERSION:
            raise P.VersionMismatch(
                f"master speaks cw protocol {P.PROTOCOL_VERSION}, peer speaks"
                f" {version}: install the same cw version everywhere"
            )

    def _require(self, role: str) -> bool:
        if self.role == role:
            return True
        self.reject(f"sent a {role} command before registering as a {role}")
        return False

    @P.RegisterClient.responder
    def register_client(self, version, host, pid, context, session, versions=None):
        self._check_version(version)
        name = check_peer(host, pid)
        weight = check_context(context)
        check_session(session)
        versions = check_versions(versions)
        self._claim("client")
        self.peer_name = name
        self.session = session
        machine = context.get(P.MACHINE)
        self.machine = check_text("context machine", machine, 200) if machine is not None else None
        self.peer_id = self.master.client_joined(self, context, weight, session, versions)
        self.role = "client"
        self.master.keeps_arguments(self, context)
        return {
            "client_id": self.peer_id,
            "max_payload": self.master.max_payload,
            "room_bytes": self.master.max_queued_bytes,
            "room_jobs": self.master.max_queued_jobs,
            "mismatched": self.master.mismatched_workers(versions),
            "references": self.master.takes_references(self),
        }

    @P.SubmitJobs.responder
    def submit_jobs(self, jobs):
        if self._require("client"):
            check_jobs(jobs)
            self.master.submit(self.peer_id, jobs)
        return {}

    @P.SessionJobs.responder
    def session_jobs(self):
        if not self._require("client"):
            return {"keys": [], "durable": self.master.durable is not None}
        keys = [(0, seq) for seq in self.master.session_jobs(self.peer_id)]
        acks = self.master.keeps_results(self.peer_id)
        return {"keys": keys, "durable": self.master.durable is not None, "acks": acks}

    @P.DefineFunction.responder
    def define_function(self, client, key, function):
        if self._require("client"):
            self.master.define_function(self.peer_id, check_function_key(key), function)
        return {}

    @P.RegisterWorker.responder
    def register_worker(
        self,
        version,
        host,
        pid,
        slots,
        launch=None,
        versions=None,
        capacity=None,
        results=None,
        sessions=None,
        machine=None,
    ):
        self._check_version(version)
        name = check_peer(host, pid)
        check_range("slots", slots, 1, MAX_SLOTS)
        resources = None if capacity is None else check_capacity(capacity)
        if launch is not None:
            check_text("launch", launch, 200)
        versions = check_versions(versions)
        sessions = check_handover(results, sessions)
        if machine is not None:
            check_text("machine", machine, 200)
        self._claim("worker")
        self.peer_name = name
        self.machine = machine
        #: The adaptive pool's launch this worker belongs to, if any.
        self.launch = launch
        self.peer_id = self.master.worker_joined(self, slots, versions, resources)
        self.role = "worker"
        if results:
            # Before any job is dispatched to it (on the reactor's next turn).
            self.master.handed_over(self.peer_id, results, sessions)
        return {"worker_id": self.peer_id, "max_payload": self.master.max_payload}

    @P.CancelJobs.responder
    def cancel_jobs(self, keys):
        if self._require("client"):
            self.master.cancel(self.peer_id, [seq for _, seq in keys])
        return {}

    @P.ResultsTaken.responder
    def results_taken(self, keys):
        if self._require("client"):
            self.master.results_taken(self.peer_id, [seq for _, seq in keys])
        return {}

    @P.ReleaseResults.responder
    def release_results(self, keys):
        if self._require("client"):
            self.master.release_results(self.peer_id, keys)
        return {}

    @P.JobResults.responder
    def job_results(self, results):
        if self._require("worker"):
            check_results(results)
            # A lone big result may have gone to its client as it arrived.
            forwarded = results[0].key if self.relayed is not None and len(results) == 1 else None
            self.master.results(self.peer_id, results, forwarded)
        return {}

    def relay_voided(self, why: str) -> None:
        self.master.cut_through_voided += 1

    def relay_destination(self, command: bytes | None, answer: bytes | None, first, total: int):
        """
        A worker's big result goes to its client as it arrives, and a
        client's argument it was asked for to its worker, where the master
        says so.
        """
        if answer is not None:
            return self.master.relay_fetched(self, answer, total) if self.role == "client" else None
        if self.role != "worker" or command != P.JobResults.commandName:
            return None
        return self.master.relay_result(self.peer_id, first, total)

    @P.OutputNotice.responder
    def output_notice(self, host, outputs):
        if self._require("worker"):
            self.master.job_output(self.peer_id, check_outputs(host, outputs), outputs)
        return {}

    @P.HandOverResults.responder
    def hand_over_results(self, results, sessions):
        if self._require("worker"):
            sessions = check_handover(results, sessions)
            self.master.handed_over(self.peer_id, results, sessions)
        return {}

    @P.ReturnJobs.responder
    def return_jobs(self, keys):
        if self._require("worker"):
            self.master.return_jobs(self.peer_id, keys)
        return {}

    @P.Heartbeat.responder
    def heartbeat(self):
        """A client checks that this master is alive (L{cw.wire.liveness})."""
        return {}

    @P.GetStatus.responder
    def get_status(self):
        return {"status": self.master.status()}

    @P.ProbeWorkers.responder
    def probe_workers(self, packages, context, wait):
        if not self._require("client"):
            return defer.Deferred()  # the connection is gone: answer nothing
        check_packages(packages)
        check_probe_context(context)
        if not 0 < wait <= MAX_PROBE_TIMEOUT:
            raise BadCommand(f"wait must be above 0 and at most {MAX_PROBE_TIMEOUT:g} s, not {wait!r}")
        d = self.master.probe_workers(packages, context, wait)
        return d.addCallback(lambda workers: {"workers": workers})

    @P.AwaitWorkers.responder
    def await_workers(self, count):
        check_range("count", count, 0, MAX_AWAIT)
        return self.master.await_workers(count).addCallback(lambda n: {"workers": n})

    # -- sending ---------------------------------------------------------

    def send_jobs(self, jobs: list[P.Job]) -> None:
        """Send jobs to this worker, in batches (what they need goes first: see C{Master._dispatch})."""
        for batch in P.batches(jobs, P.job_size):
            self.callRemote(P.RunJobs, jobs=batch)

    def send_results(self, results: list[P.Result], now: bool = False) -> None:
        """Queue results for this client; they leave on the reactor's next turn, or C{now}."""
        if self.outbox is None:
            self.outbox = Outbox(
                self.master.clock,
                lambda batch: self.callRemote(P.JobResults, results=batch),
                P.result_size,
                after_flush=lambda: push(self.transport),
            )
        if now:
            self.outbox.send_now(results)
        else:
            self.outbox.extend(results)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.master.pending.pop(self, None)
        if self.outbox is not None:
            self.outbox.discard()
        if self.role == "client":
            self.master.client_left(self)
        elif self.role == "worker":
            self.master.worker_left(self)
        self.closed.callback(None)


class MasterFactory(ServerFactory):
    def __init__(self, master: Master) -> None:
        self.master = master

    def buildProtocol(self, addr):
        return MasterProtocol(self.master)
