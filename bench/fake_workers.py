"""
Light fake workers: one process opening N worker connections to a cw master.

Each connection authenticates exactly as a real worker does
(L{cw.wire.auth.authenticate} with the secret from L{cw.wire.secret}), registers with
L{P.RegisterWorker} and answers every job at once with L{P.Outcome.OK} and a
fixed payload (C{cloudpickle.dumps(None)}, made once): jobs are never
unpickled or run.  Results leave in batches through the same
L{cw.wire.batching.Outbox} the real worker uses.  This measures the master (and
the client) with many worker connections, without a job process per slot.

    python bench/fake_workers.py --master localhost:5499 -n 200

Prints C{registered N} on stdout once every connection has registered, then
runs until SIGTERM/SIGINT; on SIGUSR1 it prints C{answered J jobs in B
boxes; heartbeats A asked N not} (so far, all connections: L{read_counts}),
which tells how many jobs the master put in a box and how many heartbeats
it sent, answered or not (L{cw.core.liveness.Liveness}).  C{--check} lists the master-to-worker commands of
L{cw.wire.commands} this module does not answer yet, and exits.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys

import cloudpickle
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from cw.wire import commands as P
from cw.wire.address import client_description, client_endpoint
from cw.wire.auth import AuthGate
from cw.wire.batching import Outbox
from cw.wire.secret import load_secret
from cw.worker.service import join_master

#: The result payload of every job: a pickled None, made once.
RESULT = cloudpickle.dumps(None)

#: Commands a worker sends (never receives): not expected from the master.
WORKER_SENDS = frozenset({"RegisterWorker", "JobResults", "ReturnJobs", "HandOverResults"})

#: Connections authenticating at once (the master drops the oldest pending
#: connection from one address beyond its --max-pending-per-address).
CONCURRENT_HANDSHAKES = 16


class FakeWorker(AuthGate, amp.AMP):
    """
    One fake worker connection.  L{HANDLERS} maps each command the master
    may send to a method name: supporting a new command is one line there.
    A command not in it is answered with an empty box (and logged once),
    so a protocol change cannot make the fake worker drop its connection.
    """

    #: Command name in L{cw.wire.commands} -> method answering it.  Names that the
    #: installed cw does not define are skipped.
    HANDLERS: dict[str, str] = {
        "ClientContext": "ignore",
        "DefineFunction": "ignore",
        "ForgetClient": "ignore",
        "RunJobs": "run_jobs",
        "CancelJobs": "ignore",
        "Heartbeat": "ignore",
        "MasterStopping": "ignore",
    }
    _by_name = {
        getattr(P, name).commandName: (getattr(P, name), method)
        for name, method in HANDLERS.items()
        if hasattr(P, name)
    }
    unknown_seen: set[bytes] = set()

    def __init__(self, farm: Farm) -> None:
        super().__init__()
        self.farm = farm
        self.outbox = Outbox(farm.reactor, self._send, P.result_size)
        self.registered = defer.Deferred()
        self.jobs = 0
        self.boxes = 0
        #: Heartbeats received that asked an answer, and that did not.
        self.beats = [0, 0]

    def connectionMade(self):
        super().connectionMade()
        join_master(self, self.farm.secret, self.farm.address, self.farm.slots).chainDeferred(self.registered)

    # -- commands from the master ----------------------------------------

    def locateResponder(self, name: bytes):
        if not self.authenticated:
            return super().locateResponder(name)  # AuthGate refuses it
        entry = self._by_name.get(name)
        if entry is not None:
            command, method = entry
            return self._wrapWithSerialization(getattr(self, method), command)
        responder = super().locateResponder(name)
        if responder is not None:
            return responder
        if name not in self.unknown_seen:
            self.unknown_seen.add(name)
            print(f"fake_workers: answering unknown command {name!r} with an empty box", file=sys.stderr)
        return lambda box: defer.succeed(amp.AmpBox())

    def ampBoxReceived(self, box):
        if box.get(amp.COMMAND) == b"Heartbeat":
            self.beats[amp.ASK not in box] += 1
        super().ampBoxReceived(box)

    def ignore(self, **kwargs):
        return {}

    def run_jobs(self, jobs):
        self.jobs += len(jobs)
        self.boxes += 1
        self.outbox.extend(P.Result(job.client, job.seq, P.Outcome.OK, RESULT) for job in jobs)
        return {}

    def _send(self, batch: list[P.Result]) -> None:
        if self.transport is not None and not self.transport.disconnecting:
            self.callRemote(P.JobResults, results=batch)

    def connectionLost(self, reason):
        self.outbox.discard()
        super().connectionLost(reason)
        self.farm.lost(self)


class Farm:
    """N fake workers of C{slots} slots each, connected to one master."""

    def __init__(self, reactor, address: str, n: int, slots: int, secret: bytes | None) -> None:
        self.reactor = reactor
        self.address = client_description(address)
        self.n = n
        self.slots = slots
        self.secret = secret
        self.protos: list[FakeWorker] = []

    @defer.inlineCallbacks
    def connect(self):
        endpoint = client_endpoint(self.reactor, self.address)
        factory = Factory.forProtocol(lambda: FakeWorker(self))
        gate = defer.DeferredSemaphore(CONCURRENT_HANDSHAKES)

        @defer.inlineCallbacks
        def one():
            proto = yield endpoint.connect(factory)
            yield proto.registered
            self.protos.append(proto)

        yield defer.gatherResults([gate.run(one) for _ in range(self.n)], consumeErrors=True)

    def lost(self, proto: FakeWorker) -> None:
        if not getattr(self, "stopping", False) and self.reactor.running:
            print("fake_workers: a connection to the master closed; stopping", file=sys.stderr)
            self.stopping = True
            self.reactor.stop()


COUNTS = re.compile(r"answered (\d+) jobs in (\d+) boxes(?:; heartbeats (\d+) asked (\d+) not)?")


def read_counts(process) -> tuple[int, int]:
    """
    Jobs and boxes of jobs (L{P.RunJobs}) answered so far by the fake
    workers running as C{process} (a C{subprocess.Popen} of this script
    with C{stdout=PIPE, text=True}, past its C{registered} line): it is
    sent SIGUSR1 and its answer read.
    """
    import signal

    process.send_signal(signal.SIGUSR1)
    line = process.stdout.readline()
    found = COUNTS.match(line)
    if found is None:
        raise RuntimeError(f"fake workers answered {line!r} to SIGUSR1 (exit code {process.poll()})")
    return int(found.group(1)), int(found.group(2))


def read_heartbeats(process) -> tuple[int, int]:
    """Heartbeats received so far that asked an answer, and that did not (as L{read_counts})."""
    import signal

    process.send_signal(signal.SIGUSR1)
    found = COUNTS.match(process.stdout.readline())
    if found is None or found.group(3) is None:
        raise RuntimeError(f"fake workers gave no heartbeat counts (exit code {process.poll()})")
    return int(found.group(3)), int(found.group(4))


def master_to_worker_commands() -> set[str]:
    """
    The commands a master may send to a worker, as L{cw.wire.commands} declares
    them: its "who talks to whom" arrows from master to worker, the
    "Worker <-> master" section (less what only workers send), and every
    command whose docstring says "master to worker(s)".
    """
    names: set[str] = set()
    for line in (P.__doc__ or "").splitlines():
        # e.g. "client --A, B--> master --C, D--> worker": each hop in turn.
        chain = re.split(r" --([\w, ]+)--> ", line.strip())
        for i in range(1, len(chain) - 1, 2):
            if chain[i - 1].split()[-1:] == ["master"] and "worker" in chain[i + 1]:
                names.update(c.strip() for c in chain[i].split(","))
    source = inspect.getsource(P)
    start = source.find("# -- Worker <-> master")
    if start >= 0:
        end = source.find("\n# --", start + 10)
        section = source[start : end if end > 0 else None]
        names.update(set(re.findall(r"^class (\w+)\(amp\.Command\)", section, re.M)) - WORKER_SENDS)
    for name in dir(P):
        value = getattr(P, name)
        if isinstance(value, type) and issubclass(value, amp.Command) and value.__doc__:
            text = " ".join(value.__doc__.lower().split())
            if re.search(r"master to (\w+ and )?workers?\b", text):
                names.add(name)
    return {name for name in names if isinstance(getattr(P, name, None), type)}


def unhandled_commands() -> list[str]:
    """Master-to-worker commands that L{FakeWorker.HANDLERS} does not name."""
    return sorted(master_to_worker_commands() - set(FakeWorker.HANDLERS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--master", default="localhost", help="HOST[:PORT] or endpoint (default localhost)")
    parser.add_argument("-n", type=int, default=200, help="connections (default 200)")
    parser.add_argument("--slots", type=int, default=1, help="slots each connection registers (default 1)")
    parser.add_argument("--secret-file", default=None, help="default: $CW_SECRET_FILE or ~/.config/cw/secret")
    parser.add_argument("--insecure", action="store_true", help="for a master running --insecure")
    parser.add_argument("--check", action="store_true", help="list unanswered master->worker commands")
    args = parser.parse_args(argv)
    if args.check:
        missing = unhandled_commands()
        print("unhandled: " + (", ".join(missing) if missing else "none"))
        sys.exit(1 if missing else 0)

    import signal

    from twisted.internet import reactor

    secret = None if args.insecure else load_secret(args.secret_file)
    farm = Farm(reactor, args.master, args.n, args.slots, secret)
    status = {"code": 0}

    def connected(_):
        print(f"registered {len(farm.protos)}", flush=True)

    def failed(f):
        print(f"fake_workers: could not register: {f.getErrorMessage()}", file=sys.stderr, flush=True)
        status["code"] = 1
        farm.stopping = True
        reactor.stop()

    def stop(signum, frame):
        farm.stopping = True
        reactor.callFromThread(reactor.stop)

    def counts(signum, frame):
        jobs = sum(p.jobs for p in farm.protos)
        boxes = sum(p.boxes for p in farm.protos)
        asked, notices = (sum(p.beats[i] for p in farm.protos) for i in (0, 1))
        print(f"answered {jobs} jobs in {boxes} boxes; heartbeats {asked} asked {notices} not", flush=True)

    signal.signal(signal.SIGUSR1, counts)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.callWhenRunning(lambda: farm.connect().addCallbacks(connected, failed))
    reactor.run(installSignalHandlers=False)
    jobs = sum(p.jobs for p in farm.protos)
    print(f"fake_workers: answered {jobs} jobs", file=sys.stderr, flush=True)
    sys.exit(status["code"])


if __name__ == "__main__":
    main()
