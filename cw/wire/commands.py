"""
The wire protocol shared by client, master, worker and job process.

Every AMP command cw sends is declared here, once (the handshake's
C{Challenge} and C{Prove} too; L{cw.wire.auth} implements it), with the
argument types.  The records they carry (jobs, results, options, status
codes) and their framing are pure and live in L{cw.core.records}; they are
re-exported here, so that one name serves both.  Master, worker and client
import these names and never build boxes of their own, so a change of
encoding happens in cw.wire alone (streaming of big boxes in
L{cw.wire.streaming}, authentication in L{cw.wire.auth}).

Layer rule: imports only Twisted's AMP, L{cw.core} and L{cw.errors}; never
the master, worker, client or launchers.

Who talks to whom::

    client, worker --Challenge, Prove--> master (the handshake, first)
    client --RegisterClient, SubmitJobs, CancelJobs, GetStatus, AwaitWorkers, ProbeWorkers--> master
    master --JobResults, JobsStarted, JobRoom, OutputNotice--> client
    worker --RegisterWorker, JobResults, ReturnJobs, OutputNotice, HandOverResults--> master
    master --ClientContext, RunJobs, CancelJobs, Probe--> worker
    master --MasterStopping--> client, worker;  master --SessionReplaced--> client
    master --Heartbeat--> client, worker;  client --Heartbeat--> master
    client --DefineFunction--> master --DefineFunction, ForgetClient--> worker
    client --ReleaseResults--> master --ReleaseResults--> worker
    master --FetchPayload--> client (an argument it left in its memory, for a worker elsewhere)
    worker --RunBatch--> job process (an ampoule child, over a pipe)

Jobs and results travel in batches: one AMP box carries many records, framed
with L{struct} headers.  AMP limits a single value to 65,535 bytes; the
L{Blob} argument type spreads a longer value over numbered keys, so a batch
or a payload of any size fits in one box.

The master treats every payload as opaque bytes.  Job payloads are
cloudpickles made by the client and opened only in a job process; result
payloads are cloudpickles made in a job process and opened only by the
client.  Big buffers may travel beside the pickle, in the same payload
(L{cw.core.payload}, L{cw.wire.pickling}); that too is opaque here.
Error reports are UTF-8 JSON so that nobody has to unpickle them.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from cw.core.payload import Segments
from cw.core.records import *  # noqa: F403 (re-exported: the wire's one namespace)
from cw.core.records import (
    CHUNK,
    _chunks,
    chunk_key,
    decode_functions,
    decode_jobs,
    decode_keys,
    decode_outputs,
    decode_results,
    encode_functions,
    encode_jobs,
    encode_keys,
    encode_outputs,
    encode_results,
    function_parts,
    job_parts,
    result_parts,
    size_key,
)
from cw.errors import AuthenticationFailed, PayloadUnavailable, SharedMemoryRefused, VersionMismatch
from cw.wire.private import python_identifier

# cw.core.records may not import Twisted, so it spells the AMP value limit out.
assert CHUNK == amp.MAX_VALUE_LENGTH, (CHUNK, amp.MAX_VALUE_LENGTH)


class Blob(amp.Argument):
    """
    A byte string of any length.

    Values up to L{CHUNK} bytes travel under their own key.  A longer value
    is cut into chunks: the first under C{name}, the rest under C{name.2},
    C{name.3}, ..., and the number of chunks under C{name.n}.  The chunk
    numbers are zero-padded to the width of the count (C{name.002} of
    C{name.n = 150}) so that, as AMP sends keys in sorted order, chunks
    arrive in order and a receiver can append each as it comes
    (L{cw.wire.streaming.ChunkReceiver}).

    Big values are not copied more than needed: the chunks sent are views
    of the value (of its parts, for an L{Encoded} value made of several),
    written piece by piece by L{cw.wire.streaming.StreamingSender}; payloads
    received in a batch are views of the joined chunks (L{_piece}), so a
    payload is a C{memoryview} or C{bytes}.  Everything that reads payloads
    (C{len}, slicing, C{pickle.loads}, writing to a transport) takes
    either.
    """

    def toBox(self, name, strings, objects, proto):
        value = objects.get(python_identifier(name))
        if value is None and self.optional:
            return
        # A payload made here as its parts (not joined) is sent as if joined.
        self._put(name, strings, (value.parts or [b""]) if isinstance(value, Segments) else [value])

    @staticmethod
    def _put(name: bytes, strings, parts: list) -> None:
        """Put the concatenation of C{parts} into C{strings}, chunked."""
        total = sum(len(part) for part in parts)
        if total <= CHUNK:
            strings[name] = parts[0] if len(parts) == 1 else b"".join(parts)
            if not isinstance(strings[name], bytes):
                strings[name] = bytes(strings[name])
            return
        count = -(-total // CHUNK)
        width = len(str(count))
        for index, chunk in enumerate(_chunks(parts), 1):
            strings[name if index == 1 else chunk_key(name, index, width)] = chunk
        strings[name + b".n"] = b"%d" % count
        strings[size_key(name)] = b"%d" % total

    def fromBox(self, name, strings, objects, proto):
        if self.optional and name not in strings:
            objects[python_identifier(name)] = None
            return
        objects[python_identifier(name)] = self._take(name, strings)

    @staticmethod
    def _take(name: bytes, strings):
        first = strings.pop(name)
        strings.pop(size_key(name), None)
        count = strings.pop(name + b".n", None)
        if count is None:
            return first
        width = len(count)
        rest = [strings.pop(chunk_key(name, i, width)) for i in range(2, int(count) + 1)]
        return b"".join([first, *rest])


class Encoded(Blob):
    """
    A L{Blob} that carries some other value: C{parts} turns it into a list
    of byte strings (sent as if joined, without joining them), C{decode}
    turns the received bytes back.  Subclasses set C{encode} (one byte
    string) and may set C{parts} to avoid copying big payloads.
    """

    @staticmethod
    def encode(value: Any) -> bytes:
        raise NotImplementedError

    def parts(self, value: Any) -> list:
        return [self.encode(value)]

    @staticmethod
    def decode(data: bytes) -> Any:
        raise NotImplementedError

    def toBox(self, name, strings, objects, proto):
        value = objects.get(python_identifier(name))
        if value is None and self.optional:
            return  # an optional argument left out: the receiver sees None
        self._put(name, strings, self.parts(value) or [b""])

    def fromBox(self, name, strings, objects, proto):
        if self.optional and name not in strings:
            objects[python_identifier(name)] = None
            return
        objects[python_identifier(name)] = self.decode(self._take(name, strings))


class JobBatch(Encoded):
    """A list of L{Job} records."""

    encode = staticmethod(encode_jobs)
    parts = staticmethod(job_parts)
    decode = staticmethod(decode_jobs)


class ResultBatch(Encoded):
    """A list of L{Result} records."""

    encode = staticmethod(encode_results)
    parts = staticmethod(result_parts)
    decode = staticmethod(decode_results)


class OutputBatch(Encoded):
    """A list of L{Output} records."""

    encode = staticmethod(encode_outputs)
    decode = staticmethod(decode_outputs)


class FunctionTable(Encoded):
    """Pickled functions by C{(client, key)}: those a job process lacks."""

    encode = staticmethod(encode_functions)
    parts = staticmethod(function_parts)
    decode = staticmethod(decode_functions)


class KeyList(Encoded):
    """A list of job keys C{(client, seq)}."""

    encode = staticmethod(encode_keys)
    decode = staticmethod(decode_keys)


#: Encodes L{JSON} arguments (made once: C{json.dumps} with options builds
#: an encoder per call, 10 us of every batch a worker hands a job process).
_json_encoder = json.JSONEncoder(separators=(",", ":"))


class JSON(Encoded):
    """A JSON-serialisable value (UTF-8 on the wire)."""

    @staticmethod
    def encode(value: Any) -> bytes:
        if type(value) is dict and not value:
            return b"{}"  # (a job process's contexts, sent with every batch, most often none)
        return _json_encoder.encode(value).encode("utf-8")

    @staticmethod
    def decode(data: bytes) -> Any:
        if data == b"{}":
            return {}
        return json.loads(str(data, "utf-8"))


# -- Client <-> master ---------------------------------------------------


class RegisterClient(amp.Command):
    """
    First command of a client connection.  C{context} is the client's working
    directory and C{sys.path}, which every job of this client runs with.
    C{session} names the client object across its connections (one it was
    given, or a generated one): a client that reconnects registers with the
    same session and resubmits its jobs under the same sequence numbers, so
    that a job is known by C{(session, seq)} whatever the connection.  A
    second registration with a session already connected replaces that
    connection (the master drops the old one and its jobs).
    C{versions}: the client's Python, cloudpickle, ... versions
    (L{cw.wire.versions.local_versions}); the master passes them on to
    workers with the context, and answers with C{mismatched}, the workers
    whose versions are incompatible with them (L{cw.core.versions}):
    C{[{"worker": name, "versions": {...}, "reasons": [...]}]}.

    A client that says in its context which machine it runs on
    (C{"machine"}: L{cw.system.machine_identity}) may send big arguments
    as references to its memory (L{cw.core.payload.reference}) if the
    answer's C{references} is true: the master then routes them to
    workers of that machine as they are and fetches the bytes for others
    (L{FetchPayload}).  A master that keeps jobs beyond their client's
    connection (C{--state}) answers false.
    """

    arguments = [
        (b"version", amp.Integer()),
        (b"host", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"context", JSON()),
        (b"session", amp.Unicode()),
        (b"versions", JSON(optional=True)),
    ]
    response = [
        (b"client_id", amp.Integer()),
        (b"max_payload", amp.Integer()),
        (b"room_bytes", amp.Integer()),
        (b"room_jobs", amp.Integer()),
        (b"mismatched", JSON(optional=True)),
        (b"references", amp.Boolean(optional=True)),
    ]
    errors = {VersionMismatch: b"VERSION_MISMATCH"}


class FetchPayload(amp.Command):
    """
    Master to client: the payload that job C{seq}'s reference stands for
    (L{cw.core.payload.reference}), for a worker on another machine than
    the client's.  A client that no longer holds it (the job ended or was
    cancelled) answers L{PayloadUnavailable}.
    """

    arguments = [(b"seq", amp.Integer())]
    response = [(b"payload", Blob())]
    errors = {PayloadUnavailable: b"PAYLOAD_UNAVAILABLE"}


class SubmitJobs(amp.Command):
    """Queue a batch of jobs.  Fire and forget: results come back later."""

    arguments = [(b"jobs", JobBatch())]
    requiresAnswer = False


class DefineFunction(amp.Command):
    """
    Client to master, then master to worker: the cloudpickled function that
    jobs name by C{key} (a digest of these bytes).  A client defines each
    function once per connection, before the first job that uses it; the
    master keeps it while the client is connected and sends it to a worker
    before the first such job it gives that worker.  A client sends
    C{client=0}; the master fills in the client's id.
    """

    arguments = [(b"client", amp.Integer()), (b"key", amp.String()), (b"function", Blob())]
    requiresAnswer = False


class JobRoom(amp.Command):
    """
    Master to client (flow control): room for C{bytes} more payload bytes
    and C{jobs} more jobs in this client's queue.  A client starts with the
    room its L{RegisterClient} answer gives (C{--max-queued-bytes},
    C{--max-queued-jobs}), sends a job only while it has room left (so at
    most one job beyond it), and keeps further jobs to itself (its
    C{submit} blocks once it holds a few hundred megabytes) until this
    command gives more, once its queue has drained to half.  Other
    commands flow as usual.
    """

    arguments = [(b"bytes", amp.Integer()), (b"jobs", amp.Integer())]
    requiresAnswer = False


class JobsStored(amp.Command):
    """
    Master to client, from a master with a state file (C{--state}): these
    jobs are committed to it, so they survive the master's crash even while
    the client is away.  Sent once per commit, for the jobs of every
    L{SubmitJobs} box that commit holds (a resubmitted job the master
    already had is acknowledged too).
    """

    arguments = [(b"keys", KeyList())]
    requiresAnswer = False


class SessionJobs(amp.Command):
    """
    Client to master: the numbers of the jobs of this client's session
    that the master holds (queued, running, or with a result waiting for
    it, which follows in L{JobResults}), so that a client re-attaching to
    its session from a new process can give them futures and number its
    own jobs after them.  C{durable}: whether the master keeps a state
    file (C{--state}), without which nothing outlives a connection.
    C{acks}: whether that master keeps the results it sends this client
    until the client acknowledges them (L{ResultsTaken}): true for a
    durable master and a client that registered with L{TAKES_RESULTS} in
    its context.
    """

    response = [(b"keys", KeyList()), (b"durable", amp.Boolean()), (b"acks", amp.Boolean(optional=True))]


class GetStatus(amp.Command):
    """Ask the master for a snapshot of its state (workers, queue, counts)."""

    response = [(b"status", JSON())]


class AwaitWorkers(amp.Command):
    """Answered once at least C{count} workers are registered."""

    arguments = [(b"count", amp.Integer())]
    response = [(b"workers", amp.Integer())]


class ProbeWorkers(amp.Command):
    """
    Client to master (C{ClusterExecutor.versions()}, C{cw doctor}): ask
    every worker, through L{Probe}, for its versions and those of the
    distributions named in C{packages}, and, given a C{context} (a working
    directory and C{sys.path} entries), whether it can enter and see them.
    Answered once every worker answered or C{wait} seconds passed:
    C{workers} is C{[{"id", "peer", "report"} or {"id", "peer", "error"}]}.
    """

    arguments = [
        (b"packages", JSON()),
        (b"context", JSON(optional=True)),
        (b"wait", amp.Float()),
    ]
    response = [(b"workers", JSON())]


class SessionReplaced(amp.Command):
    """
    Master to client, before it drops the connection: another connection
    registered this client's session (L{RegisterClient}), so this one's
    jobs are dropped.  The client fails its jobs and does not reconnect.
    """

    arguments = [(b"reason", amp.Unicode())]
    requiresAnswer = False


# -- Worker <-> master ---------------------------------------------------


class RegisterWorker(amp.Command):
    """
    First command of a worker connection: who it is and how many slots
    (the most jobs it runs at once); C{versions}, as for L{RegisterClient}
    (L{cw.wire.versions.worker_versions}); C{capacity}, what it has
    (L{cw.core.resources.Capacity.to_json}: cores, memory, GPU ids, custom
    resources, tags; default a core per slot).
    """

    arguments = [
        (b"version", amp.Integer()),
        (b"host", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"slots", amp.Integer()),
        # The adaptive pool's launch this worker belongs to (cw.master.pool).
        (b"launch", amp.Unicode(optional=True)),
        (b"versions", JSON(optional=True)),
        (b"capacity", JSON(optional=True)),
        # Results of jobs that finished while this worker had no master,
        # each with its client's session (see HandOverResults).
        (b"results", ResultBatch(optional=True)),
        (b"sessions", JSON(optional=True)),
        # The machine it runs on (cw.system.machine_identity): its job
        # processes open references of clients of that machine.
        (b"machine", amp.Unicode(optional=True)),
    ]
    response = [(b"worker_id", amp.Integer()), (b"max_payload", amp.Integer())]
    errors = {VersionMismatch: b"VERSION_MISMATCH"}


class HandOverResults(amp.Command):
    """
    Worker to master: results of jobs that a previous master gave this
    worker and that finished after that connection was lost (the first
    such results travel in L{RegisterWorker}, so that the master has them
    before it hands this worker any job).  Each result's C{client} is the
    index, from 1, of its client's session in C{sessions}; the master gives
    each to the client of that session that resubmitted the job (by its
    C{seq}), keeps it a while for a client not back yet, and otherwise
    drops it.
    """

    arguments = [(b"results", ResultBatch()), (b"sessions", JSON())]
    requiresAnswer = False


class ClientContext(amp.Command):
    """
    Master to worker: the working directory and C{sys.path} of a client,
    sent before that client's first job reaches this worker; with the
    client's versions under C{"versions"} when it reported them (a worker
    fails the jobs of an incompatible client, L{cw.core.versions}).
    """

    arguments = [(b"client", amp.Integer()), (b"context", JSON())]
    requiresAnswer = False


class Probe(amp.Command):
    """
    Master to worker (for L{ProbeWorkers}): C{report} is
    C{{"versions": ..., "packages": {name: version or None}, "time": the
    worker's clock, "host": ...}}, plus C{"cwd_error"} and C{"missing"}
    (L{cw.wire.versions.probe_paths}) when a C{context} is given.
    """

    arguments = [(b"packages", JSON()), (b"context", JSON(optional=True))]
    response = [(b"report", JSON())]


class ForgetClient(amp.Command):
    """
    Master to worker: this client left; drop its context and functions.
    """

    arguments = [(b"client", amp.Integer())]
    requiresAnswer = False


class RunJobs(amp.Command):
    """Master to worker: run these jobs (within the worker's credit)."""

    arguments = [(b"jobs", JobBatch())]
    requiresAnswer = False


class CancelJobs(amp.Command):
    """
    Client to master, and master to worker: withdraw these jobs.  A client
    sends C{(0, seq)} keys; the master forwards C{(client, seq)} keys of jobs
    a worker holds.  Queued jobs are dropped; running ones are killed.
    """

    arguments = [(b"keys", KeyList())]
    requiresAnswer = False


class JobResults(amp.Command):
    """
    Worker to master, and master to client: jobs that ended.  A big
    result whose client is on the worker's machine may come as a reference
    to the worker's memory file instead of its bytes
    (L{cw.core.payload.ResultReference}, status L{Outcome.OK}); the master
    forwards it as any payload, and the client maps the file, then sends
    L{ReleaseResults}.
    """

    arguments = [(b"results", ResultBatch())]
    requiresAnswer = False


class StoredResults(amp.Command):
    """
    Master to client: results that waited on the master's disk (C{--state})
    for this client's session while it was away, sent after the answer to
    L{SessionJobs}, one batch at a time.  The client answers once it has
    them; only then does the master delete them, so that a client that
    drops before gets them again when its session next attaches.
    """

    arguments = [(b"results", ResultBatch())]
    response = []


class ResultsTaken(amp.Command):
    """
    Client to a master that keeps a state file (L{SessionJobs}'s C{acks}):
    the client has these results, sent in L{JobResults}; the master may
    forget them.  Until then the master keeps each one, and gives those of
    a client that dies first to the session's next client
    (L{StoredResults}).  Batched: one box for the results that arrived in a
    reactor turn.  C{keys}: C{(0, seq)}.
    """

    arguments = [(b"keys", KeyList())]
    requiresAnswer = False


class ReleaseResults(amp.Command):
    """
    Client to master, then master to worker: the worker may close the
    memory files of these results sent by reference (L{JobResults}): the
    client has mapped them (or given up on them).  A client sends
    C{(worker, seq)} keys, C{worker} being the reference's worker id; the
    master forwards C{(client, seq)} keys to each worker.  A worker also
    closes a client's files when told to forget it (L{ForgetClient}), and
    all of them when it loses its master.
    """

    arguments = [(b"keys", KeyList())]
    requiresAnswer = False


#: Seconds the master waits before telling a client its jobs were handed to
#: workers (L{JobsStarted}): the notices of many dispatch rounds share a
#: box, and a job whose result comes first needs none (its result says it
#: ran), so a short lone job costs one message less (issue 18, item 4).
RUNNING_NOTICE_DELAY = 0.005


class JobsStarted(amp.Command):
    """
    Master to client: these jobs were handed to workers, so their futures
    are running (and can no longer be cancelled, only killed; a job
    cancelled before its notice arrives is killed on its worker).  Sent
    L{RUNNING_NOTICE_DELAY} after the jobs were handed out, one box for all
    of a client's jobs, none for jobs whose results came first, and only to
    clients that registered with L{RUNNING_NOTICES} in their context.
    """

    arguments = [(b"keys", KeyList())]
    requiresAnswer = False


class OutputNotice(amp.Command):
    """
    Worker to master, and master to client: what running jobs wrote since
    the last notice (L{Output} records), on worker C{host}.  Sent only for
    jobs whose client asked to see their output as it comes (the job
    options C{echo} and C{log}), about twice a second while each runs, and
    before the job's result; the master passes them on at once and keeps
    nothing.
    """

    arguments = [(b"host", amp.Unicode()), (b"outputs", OutputBatch())]
    requiresAnswer = False


class Heartbeat(amp.Command):
    """
    Master to worker and client, and client to master, every few seconds:
    a peer that is not heard from in time is declared lost even if its TCP
    connection looks open (a frozen machine, a stopped process, a cable
    pulled, a half-open link).  Answered with an empty box; see
    L{cw.wire.liveness}.
    """


class HeartbeatNotice(Heartbeat):
    """
    A L{Heartbeat} that asks no answer (an AMP box without C{_ask}, which
    any peer's L{Heartbeat} responder takes as it is), sent to a peer heard
    from within the interval: its answer would tell nothing new, only the
    heartbeat's arrival matters to it (L{cw.core.liveness.Liveness}).
    """

    commandName = b"Heartbeat"
    requiresAnswer = False


class ReturnJobs(amp.Command):
    """
    Worker to master, when the worker is stopping gracefully: it will start
    none of these jobs (its unstarted, prefetched ones) and wants no new
    ones.  The master puts them back at the front of the queue at once,
    without counting an attempt, and sends this worker nothing more; the
    worker finishes its running jobs, reports them and leaves.  Sent again
    for jobs that were on their way when the worker began to drain.
    """

    arguments = [(b"keys", KeyList())]


class MasterStopping(amp.Command):
    """
    Master to clients and workers, just before a master that was told to
    stop closes their connections: clients fail their outstanding jobs at
    once with this reason, workers log it and keep trying to reconnect.
    """

    arguments = [(b"reason", amp.Unicode())]
    requiresAnswer = False


# -- Worker <-> job process ----------------------------------------------


class RunBatch(amp.Command):
    """
    Run jobs one after another in a job process; answer with one result per
    job, in order.  C{contexts} holds the working directory and C{sys.path}
    (C{{"cwd": ..., "path": [...]}}) of each client, by client id as a
    string, that this job process has not been sent before; C{functions}
    holds the cached functions the jobs use that it does not hold (see
    L{cw.worker.pool.ChildLink}, which tracks both).

    C{shared} says which payloads lie in shared memory rather than in the
    box (L{cw.worker.shared}): in the call, C{pid} (the worker's), C{fd},
    C{size} and C{jobs} (C{[index, offset, length]} of each job whose
    payload lies in that file, its payload in the box empty), and
    C{reply}, the file to put big results in from now on; in the answer,
    C{size} and C{results} (the same triples, of the results in the reply
    file).  A job process that cannot open the file refuses the call
    (L{SharedMemoryRefused}) before running anything.
    """

    arguments = [
        (b"jobs", JobBatch()),
        (b"contexts", JSON()),
        (b"functions", FunctionTable()),
        (b"shared", JSON(optional=True)),
    ]
    response = [(b"results", ResultBatch()), (b"shared", JSON(optional=True))]
    errors = {SharedMemoryRefused: b"SHARED_MEMORY_REFUSED"}


class Challenge(amp.Command):
    """
    Start the handshake: the peer's role, nonce and protocol version (none
    before version 7); the answer carries the master's version too.
    """

    arguments = [(b"role", amp.Unicode()), (b"nonce", amp.String()), (b"version", amp.Integer(optional=True))]
    response = [(b"nonce", amp.String()), (b"proof", amp.String()), (b"version", amp.Integer(optional=True))]
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


class Prove(amp.Command):
    """Finish the handshake: the peer's proof over both nonces."""

    arguments = [(b"proof", amp.String())]
    response: list = []
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}
