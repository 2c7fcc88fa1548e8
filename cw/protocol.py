"""
The wire protocol shared by client, master, worker and job process.

Everything that crosses a connection is declared here, once: the AMP commands,
their argument types, the record layouts of job and result batches and the
status codes.  Master, worker and client import these names and never build
boxes of their own, so a change of encoding (streaming, compression,
authentication) happens in this module alone.

Who talks to whom::

    client --RegisterClient, SubmitJobs, GetStatus, AwaitWorkers--> master
    master --JobResults, JobsStarted, JobRoom--> client
    worker --RegisterWorker, JobResults, ReturnJobs--> master
    master --ClientContext, RunJobs, Heartbeat--> worker
    master --MasterStopping--> client, worker
    master --Heartbeat--> client, worker;  client --Heartbeat--> master
    client --DefineFunction--> master --DefineFunction, ForgetClient--> worker
    worker --RunBatch--> job process (an ampoule child, over a pipe)

Jobs and results travel in batches: one AMP box carries many records, framed
with L{struct} headers.  AMP limits a single value to 65,535 bytes; the
L{Blob} argument type spreads a longer value over numbered keys, so a batch
or a payload of any size fits in one box.

The master treats every payload as opaque bytes.  Job payloads are
cloudpickles made by the client and opened only in a job process; result
payloads are cloudpickles made in a job process and opened only by the
client.  Error reports are UTF-8 JSON so that nobody has to unpickle them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.protocols import amp

#: The TCP port a master listens on unless told otherwise.
PORT = 5494

#: Largest job or result payload a master accepts unless told otherwise
#: (C{--max-payload}); clients refuse bigger jobs at submit.
MAX_PAYLOAD = 4 << 30

#: Bumped whenever a peer of an older version could misread a box.
PROTOCOL_VERSION = 3

#: Largest value AMP carries under one key.
CHUNK = amp.MAX_VALUE_LENGTH

#: A batch box is closed once its records add up to this many bytes; more
#: records go into the next box.  Keeps one box from growing without bound
#: while still putting thousands of tiny jobs into one box.
BATCH_BYTES = 1 << 20


class Outcome:
    """
    How a job ended; carried in every result record.
    """

    #: The payload is the cloudpickled return value.
    OK = 0
    #: The job raised; the payload is a JSON error report.
    RAISED = 1
    #: The job's process died or could not run it; JSON error report.
    CRASHED = 2
    #: The master or worker could not run the job at all; JSON error report.
    FAILED = 3


class Blob(amp.Argument):
    """
    A byte string of any length.

    Values up to L{CHUNK} bytes travel under their own key.  A longer value
    is cut into chunks: the first under C{name}, the rest under C{name.2},
    C{name.3}, ..., and the number of chunks under C{name.n}.  The chunk
    numbers are zero-padded to the width of the count (C{name.002} of
    C{name.n = 150}) so that, as AMP sends keys in sorted order, chunks
    arrive in order and a receiver can append each as it comes
    (L{cw.streaming.ChunkReceiver}).

    Big values are not copied more than needed: the chunks sent are views
    of the value (of its parts, for an L{Encoded} value made of several),
    written piece by piece by L{cw.streaming.StreamingSender}; payloads
    received in a batch are views of the joined chunks (L{_piece}), so a
    payload is a C{memoryview} or C{bytes}.  Everything that reads payloads
    (C{len}, slicing, C{pickle.loads}, writing to a transport) takes
    either.
    """

    def toBox(self, name, strings, objects, proto):
        self._put(name, strings, [objects[amp._wireNameToPythonIdentifier(name)]])

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

    def fromBox(self, name, strings, objects, proto):
        objects[amp._wireNameToPythonIdentifier(name)] = self._take(name, strings)

    @staticmethod
    def _take(name: bytes, strings):
        first = strings.pop(name)
        count = strings.pop(name + b".n", None)
        if count is None:
            return first
        width = len(count)
        rest = [strings.pop(chunk_key(name, i, width)) for i in range(2, int(count) + 1)]
        return b"".join([first, *rest])


def chunk_key(name: bytes, index: int, width: int) -> bytes:
    """The key of chunk C{index} (2 or more) of a L{Blob} value under C{name}."""
    return b"%s.%0*d" % (name, width, index)


def _chunks(parts: list) -> Iterator:
    """
    Cut the concatenation of C{parts} into pieces of L{CHUNK} bytes:
    views of the parts where a piece lies within one part, a small copy
    where it straddles two.
    """
    pending: list = []
    pending_size = 0
    for part in parts:
        view = memoryview(part)
        start = 0
        if pending:
            take = min(CHUNK - pending_size, len(view))
            pending.append(view[:take])
            pending_size += take
            start = take
            if pending_size < CHUNK:
                continue
            yield b"".join(pending)
            pending, pending_size = [], 0
        while len(view) - start >= CHUNK:
            yield view[start : start + CHUNK]
            start += CHUNK
        if start < len(view):
            pending, pending_size = [view[start:]], len(view) - start
    if pending:
        yield b"".join(pending)


#: Payloads at least this long are kept as views into the buffer they
#: arrived in rather than copied out of it.
VIEW_THRESHOLD = CHUNK


def _piece(view: memoryview, start: int, end: int):
    """C{view[start:end]}: a copy if short, a view of the same buffer if long."""
    if end - start >= VIEW_THRESHOLD:
        return view[start:end]
    return bytes(view[start:end])


@dataclass(slots=True)
class Job:
    """
    One job as it travels: who sent it, its number within that client,
    the opaque payload, options (JSON bytes, empty for defaults) and the
    key of a cached function (empty for none).

    C{client} is 0 on the client's own side; the master fills it in.

    Without C{func}, the payload is a cloudpickled C{(function, args,
    kwargs)}.  With it, the payload is a cloudpickled C{(args, kwargs)} and
    the function is the one the client defined under that key
    (L{DefineFunction}), sent to each worker and job process once rather
    than with every job.
    """

    client: int
    seq: int
    payload: bytes
    options: bytes = b""
    func: bytes = b""

    @property
    def key(self) -> tuple[int, int]:
        return (self.client, self.seq)


def encode_options(**options: Any) -> bytes:
    """
    A job's options as they travel in L{Job.options}: JSON of the options
    that are not C{None}, or nothing at all when every one is a default.

    Known options: C{timeout} (seconds the job may run before its process is
    killed) and C{max_attempts} (how many lost workers the job may outlive).
    """
    given = {k: v for k, v in options.items() if v is not None}
    return json.dumps(given, separators=(",", ":")).encode("utf-8") if given else b""


def valid_timeout(value: Any) -> bool:
    """True if C{value} is usable as a job's C{timeout}: finite seconds > 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def read_options(job: Job) -> dict:
    """Undo L{encode_options}; malformed options count as no options."""
    if not job.options:
        return {}
    try:
        options = json.loads(job.options.decode("utf-8"))
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}


@dataclass(slots=True)
class Result:
    """
    The outcome of one job: the same C{client} and C{seq} as its L{Job}, a
    L{Outcome} code, and the payload that code describes.
    """

    client: int
    seq: int
    status: int
    payload: bytes

    @property
    def key(self) -> tuple[int, int]:
        return (self.client, self.seq)


#: client, seq, options length, function key length, payload length.
_JOB = struct.Struct("!IQHBQ")
_RESULT = struct.Struct("!IQBQ")


def encode_jobs(jobs: Iterable[Job]) -> bytes:
    """Frame L{Job} records into one byte string."""
    return b"".join(job_parts(jobs))


def job_parts(jobs: Iterable[Job]) -> list:
    """L{encode_jobs} as a list of pieces, the payloads not copied."""
    parts = []
    for job in jobs:
        if len(job.options) > 0xFFFF:
            raise ValueError(f"job {job.seq}: options exceed 65,535 bytes")
        if len(job.func) > 0xFF:
            raise ValueError(f"job {job.seq}: function key exceeds 255 bytes")
        parts.append(_JOB.pack(job.client, job.seq, len(job.options), len(job.func), len(job.payload)))
        parts.append(job.options)
        parts.append(job.func)
        parts.append(job.payload)
    return parts


def decode_jobs(data: bytes) -> list[Job]:
    """Undo L{encode_jobs}; raise L{ValueError} on a malformed batch."""
    jobs = []
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _JOB.size:
            raise ValueError("truncated job record header")
        client, seq, olen, flen, plen = _JOB.unpack_from(data, offset)
        offset += _JOB.size
        if offset + olen + flen + plen > end:
            raise ValueError("truncated job record")
        options = bytes(view[offset : offset + olen])
        offset += olen
        func = bytes(view[offset : offset + flen])
        offset += flen
        payload = _piece(view, offset, offset + plen)
        offset += plen
        jobs.append(Job(client, seq, payload, options, func))
    return jobs


def encode_results(results: Iterable[Result]) -> bytes:
    """Frame L{Result} records into one byte string."""
    return b"".join(result_parts(results))


def result_parts(results: Iterable[Result]) -> list:
    """L{encode_results} as a list of pieces, the payloads not copied."""
    parts = []
    for r in results:
        parts.append(_RESULT.pack(r.client, r.seq, r.status, len(r.payload)))
        parts.append(r.payload)
    return parts


def decode_results(data: bytes) -> list[Result]:
    """Undo L{encode_results}; raise L{ValueError} on a malformed batch."""
    results = []
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _RESULT.size:
            raise ValueError("truncated result record header")
        client, seq, status, plen = _RESULT.unpack_from(data, offset)
        offset += _RESULT.size
        if offset + plen > end:
            raise ValueError("truncated result record")
        results.append(Result(client, seq, status, _piece(view, offset, offset + plen)))
        offset += plen
    return results


def batches(records: list, size=len, limit: int = BATCH_BYTES) -> Iterator[list]:
    """
    Split C{records} into consecutive lists whose C{size} adds up to at most
    C{limit} (a single larger record gets a list of its own).
    """
    batch: list = []
    total = 0
    for record in records:
        n = size(record)
        if batch and total + n > limit:
            yield batch
            batch, total = [], 0
        batch.append(record)
        total += n
    if batch:
        yield batch


def job_size(job: Job) -> int:
    return _JOB.size + len(job.payload) + len(job.options) + len(job.func)


def result_size(result: Result) -> int:
    return _RESULT.size + len(result.payload)


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
        parts = self.parts(objects[amp._wireNameToPythonIdentifier(name)])
        self._put(name, strings, parts or [b""])

    def fromBox(self, name, strings, objects, proto):
        objects[amp._wireNameToPythonIdentifier(name)] = self.decode(self._take(name, strings))


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


#: client, key length, function length.
_FUNCTION = struct.Struct("!IBQ")


def encode_functions(table: dict[tuple[int, bytes], bytes]) -> bytes:
    """Frame C{{(client, key): pickled function}} into one byte string."""
    return b"".join(function_parts(table))


def function_parts(table: dict[tuple[int, bytes], bytes]) -> list:
    """L{encode_functions} as a list of pieces, the functions not copied."""
    parts = []
    for (client, key), function in table.items():
        parts.append(_FUNCTION.pack(client, len(key), len(function)))
        parts.append(key)
        parts.append(function)
    return parts


def decode_functions(data: bytes) -> dict[tuple[int, bytes], bytes]:
    """Undo L{encode_functions}; raise L{ValueError} on a malformed table."""
    table = {}
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _FUNCTION.size:
            raise ValueError("truncated function record header")
        client, klen, flen = _FUNCTION.unpack_from(data, offset)
        offset += _FUNCTION.size
        if offset + klen + flen > end:
            raise ValueError("truncated function record")
        key = bytes(view[offset : offset + klen])
        offset += klen
        table[(client, key)] = _piece(view, offset, offset + flen)
        offset += flen
    return table


class FunctionTable(Encoded):
    """Pickled functions by C{(client, key)}: those a job process lacks."""

    encode = staticmethod(encode_functions)
    parts = staticmethod(function_parts)
    decode = staticmethod(decode_functions)


_KEY = struct.Struct("!IQ")


def encode_keys(keys: Iterable[tuple[int, int]]) -> bytes:
    """Pack job keys C{(client, seq)}."""
    return b"".join(_KEY.pack(client, seq) for client, seq in keys)


def decode_keys(data: bytes) -> list[tuple[int, int]]:
    """Undo L{encode_keys}; raise L{ValueError} on a malformed list."""
    if len(data) % _KEY.size:
        raise ValueError("truncated job key list")
    return [key for key in _KEY.iter_unpack(data)]


class KeyList(Encoded):
    """A list of job keys C{(client, seq)}."""

    encode = staticmethod(encode_keys)
    decode = staticmethod(decode_keys)


class JSON(Encoded):
    """A JSON-serialisable value (UTF-8 on the wire)."""

    @staticmethod
    def encode(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def decode(data: bytes) -> Any:
        return json.loads(str(data, "utf-8"))


class VersionMismatch(Exception):
    """The peer speaks another protocol version."""


class NotRegistered(Exception):
    """A command arrived before the peer registered."""


# -- Client <-> master ---------------------------------------------------


class RegisterClient(amp.Command):
    """
    First command of a client connection.  C{context} is the client's working
    directory and C{sys.path}, which every job of this client runs with.
    """

    arguments = [
        (b"version", amp.Integer()),
        (b"host", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"context", JSON()),
    ]
    response = [
        (b"client_id", amp.Integer()),
        (b"max_payload", amp.Integer()),
        (b"room_bytes", amp.Integer()),
        (b"room_jobs", amp.Integer()),
    ]
    errors = {VersionMismatch: b"VERSION_MISMATCH"}


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


class GetStatus(amp.Command):
    """Ask the master for a snapshot of its state (workers, queue, counts)."""

    response = [(b"status", JSON())]


class AwaitWorkers(amp.Command):
    """Answered once at least C{count} workers are registered."""

    arguments = [(b"count", amp.Integer())]
    response = [(b"workers", amp.Integer())]


# -- Worker <-> master ---------------------------------------------------


class RegisterWorker(amp.Command):
    """First command of a worker connection: who it is and how many slots."""

    arguments = [
        (b"version", amp.Integer()),
        (b"host", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"slots", amp.Integer()),
    ]
    response = [(b"worker_id", amp.Integer()), (b"max_payload", amp.Integer())]
    errors = {VersionMismatch: b"VERSION_MISMATCH"}


class ClientContext(amp.Command):
    """
    Master to worker: the working directory and C{sys.path} of a client,
    sent before that client's first job reaches this worker.
    """

    arguments = [(b"client", amp.Integer()), (b"context", JSON())]
    requiresAnswer = False


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
    """Worker to master, and master to client: jobs that ended."""

    arguments = [(b"results", ResultBatch())]
    requiresAnswer = False


class JobsStarted(amp.Command):
    """
    Master to client: these jobs were handed to workers, so their futures
    are running (and can no longer be cancelled, only killed).  Sent once
    per dispatch round, one box for all of a client's jobs, and only to
    clients that registered with L{RUNNING_NOTICES} in their context.
    """

    arguments = [(b"keys", KeyList())]
    requiresAnswer = False


#: The key of a client's registration context that asks for L{JobsStarted}.
RUNNING_NOTICES = "running_notices"


class Heartbeat(amp.Command):
    """
    Master to worker and client, and client to master, every few seconds:
    a peer that is not heard from in time is declared lost even if its TCP
    connection looks open (a frozen machine, a stopped process, a cable
    pulled, a half-open link).  Answered with an empty box; see
    L{cw.liveness}.
    """


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
    L{cw.pool.ChildLink}, which tracks both).
    """

    arguments = [
        (b"jobs", JobBatch()),
        (b"contexts", JSON()),
        (b"functions", FunctionTable()),
    ]
    response = [(b"results", ResultBatch())]


def box_limit(max_payload: int) -> int:
    """Largest AMP box (bytes of values) to accept when payloads may reach C{max_payload}."""
    return max_payload + 2 * BATCH_BYTES


def too_big(what: str, size: int, max_payload: int) -> str:
    """The message for a payload over the master's limit."""
    return f"{what} is {size:,} bytes, over the master's limit of {max_payload:,} (cw-master --max-payload)"


def error_report(kind: str, message: str, traceback: str = "", **extra: Any) -> bytes:
    """The JSON payload of a failed L{Result}."""
    report = {"type": kind, "message": message, "traceback": traceback}
    report.update(extra)
    return json.dumps(report).encode("utf-8")


def read_error_report(payload: bytes) -> dict:
    """Parse an L{error_report}; tolerate garbage by wrapping it."""
    try:
        report = json.loads(str(payload, "utf-8"))
        if isinstance(report, dict):
            return report
    except ValueError:
        pass
    return {"type": "Error", "message": repr(payload[:200]), "traceback": ""}
