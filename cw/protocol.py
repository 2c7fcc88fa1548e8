"""
The wire protocol shared by client, master, worker and job process.

Everything that crosses a connection is declared here, once: the AMP commands,
their argument types, the record layouts of job and result batches and the
status codes.  Master, worker and client import these names and never build
boxes of their own, so a change of encoding (streaming, compression,
authentication) happens in this module alone.

Who talks to whom::

    client --RegisterClient, SubmitJobs, GetStatus, AwaitWorkers--> master
    master --JobResults--> client
    worker --RegisterWorker, JobResults, ReturnJobs--> master
    master --ClientContext, RunJobs, Heartbeat--> worker
    master --MasterStopping--> client, worker
    worker --RunJob--> job process (an ampoule child, over a pipe)

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
PROTOCOL_VERSION = 1

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
    C{name.3}, ..., and the number of chunks under C{name.n}.
    """

    def toBox(self, name, strings, objects, proto):
        value = objects[amp._wireNameToPythonIdentifier(name)]
        if len(value) <= CHUNK:
            strings[name] = bytes(value)
            return
        view = memoryview(value)
        count = 0
        for start in range(0, len(value), CHUNK):
            count += 1
            key = name if count == 1 else b"%s.%d" % (name, count)
            strings[key] = bytes(view[start : start + CHUNK])
        strings[name + b".n"] = b"%d" % count

    def fromBox(self, name, strings, objects, proto):
        first = strings.pop(name)
        count = strings.pop(name + b".n", None)
        if count is not None:
            rest = [strings.pop(b"%s.%d" % (name, i)) for i in range(2, int(count) + 1)]
            first = b"".join([first, *rest])
        objects[amp._wireNameToPythonIdentifier(name)] = first


@dataclass(slots=True)
class Job:
    """
    One job as it travels: who sent it, its number within that client,
    the opaque payload, and options (JSON bytes, empty for defaults).

    C{client} is 0 on the client's own side; the master fills it in.
    """

    client: int
    seq: int
    payload: bytes
    options: bytes = b""

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


_JOB = struct.Struct("!IQHQ")
_RESULT = struct.Struct("!IQBQ")


def encode_jobs(jobs: Iterable[Job]) -> bytes:
    """Frame L{Job} records into one byte string."""
    parts = []
    for job in jobs:
        if len(job.options) > 0xFFFF:
            raise ValueError(f"job {job.seq}: options exceed 65,535 bytes")
        parts.append(_JOB.pack(job.client, job.seq, len(job.options), len(job.payload)))
        parts.append(job.options)
        parts.append(job.payload)
    return b"".join(parts)


def decode_jobs(data: bytes) -> list[Job]:
    """Undo L{encode_jobs}; raise L{ValueError} on a malformed batch."""
    jobs = []
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _JOB.size:
            raise ValueError("truncated job record header")
        client, seq, olen, plen = _JOB.unpack_from(data, offset)
        offset += _JOB.size
        if offset + olen + plen > end:
            raise ValueError("truncated job record")
        options = bytes(view[offset : offset + olen])
        offset += olen
        payload = bytes(view[offset : offset + plen])
        offset += plen
        jobs.append(Job(client, seq, payload, options))
    return jobs


def encode_results(results: Iterable[Result]) -> bytes:
    """Frame L{Result} records into one byte string."""
    parts = []
    for r in results:
        parts.append(_RESULT.pack(r.client, r.seq, r.status, len(r.payload)))
        parts.append(r.payload)
    return b"".join(parts)


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
        results.append(Result(client, seq, status, bytes(view[offset : offset + plen])))
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
    return _JOB.size + len(job.payload) + len(job.options)


def result_size(result: Result) -> int:
    return _RESULT.size + len(result.payload)


class Encoded(Blob):
    """
    A L{Blob} that carries some other value: C{encode} turns it into bytes
    before chunking, C{decode} turns the joined bytes back.
    """

    @staticmethod
    def encode(value: Any) -> bytes:
        raise NotImplementedError

    @staticmethod
    def decode(data: bytes) -> Any:
        raise NotImplementedError

    def toBox(self, name, strings, objects, proto):
        key = amp._wireNameToPythonIdentifier(name)
        Blob.toBox(self, name, strings, {key: self.encode(objects[key])}, proto)

    def fromBox(self, name, strings, objects, proto):
        Blob.fromBox(self, name, strings, objects, proto)
        key = amp._wireNameToPythonIdentifier(name)
        objects[key] = self.decode(objects[key])


class JobBatch(Encoded):
    """A list of L{Job} records."""

    encode = staticmethod(encode_jobs)
    decode = staticmethod(decode_jobs)


class ResultBatch(Encoded):
    """A list of L{Result} records."""

    encode = staticmethod(encode_results)
    decode = staticmethod(decode_results)


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
        return json.loads(data.decode("utf-8"))


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
    response = [(b"client_id", amp.Integer()), (b"max_payload", amp.Integer())]
    errors = {VersionMismatch: b"VERSION_MISMATCH"}


class SubmitJobs(amp.Command):
    """Queue a batch of jobs.  Fire and forget: results come back later."""

    arguments = [(b"jobs", JobBatch())]
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


class Heartbeat(amp.Command):
    """
    Master to worker, every few seconds: a worker that does not answer in
    time is declared lost even if its TCP connection looks open (a frozen
    machine, a cable pulled, a half-open link).
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


class RunJob(amp.Command):
    """Run one job in a job process and answer with its L{Outcome} and payload."""

    arguments = [
        (b"cwd", amp.Unicode()),
        (b"path", JSON()),
        (b"payload", Blob()),
    ]
    response = [(b"status", amp.Integer()), (b"payload", Blob())]


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
        report = json.loads(payload.decode("utf-8"))
        if isinstance(report, dict):
            return report
    except ValueError:
        pass
    return {"type": "Error", "message": repr(payload[:200]), "traceback": ""}
