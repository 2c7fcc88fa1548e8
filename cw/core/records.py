"""
Job, result and option records of cw and their binary framing: pure (no
Twisted, no I/O).  The AMP commands that carry them are in cw.wire.commands.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cw.core.payload import Segments
from cw.errors import ReportKind

#: The TCP port a master listens on unless told otherwise.
PORT = 5494


#: Largest job or result payload a master accepts unless told otherwise
#: (C{--max-payload}); clients refuse bigger jobs at submit.
MAX_PAYLOAD = 4 << 30


#: Bumped whenever a peer of an older version could misread a box.
PROTOCOL_VERSION = 9


#: Largest value AMP carries under one key.
CHUNK = 0xFFFF  # amp.MAX_VALUE_LENGTH: cw.wire.commands asserts they are equal


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


def chunk_key(name: bytes, index: int, width: int) -> bytes:
    """The key of chunk C{index} (2 or more) of a L{Blob} value under C{name}."""
    return b"%s.%0*d" % (name, width, index)


def size_key(name: bytes) -> bytes:
    """
    The key of the total length of a chunked L{Blob} value under C{name}:
    it sorts after C{name} and before its chunk 2 (C{"+"} before the
    digits), so that a receiver learns the length after the first chunk
    and can put the value in one buffer of that size rather than growing
    one as chunks arrive.  A hint only: a receiver that ignores it, or
    finds it wrong, assembles the value all the same (the box's MAC covers it).
    """
    return name + b".+"


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
    than with every job.  Either pickle may carry big buffers beside it
    (L{cw.core.payload}); where it is made, such a payload is a
    L{Segments}, written part by part without being joined.
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
    killed), C{max_attempts} (how many lost workers the job may outlive),
    C{priority}, C{expected_duration} (seconds it is expected to run; see
    the scheduler's walltime rule), C{echo} (send its output while it runs)
    and C{log} (send its C{logging} records at or above this level while it
    runs); C{resources} and C{tags} (see L{cw.core.resources}) and C{env}
    (environment variables it runs with, L{cw.core.validation.check_env}).
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
    L{Outcome} code, and the payload that code describes.  C{stdout} and
    C{stderr} are what the job wrote to them (bounded by its job process,
    see C{cw-worker --output-limit}): bytes of text, never pickled, so the
    master can show them (the dashboard's failures).
    """

    client: int
    seq: int
    status: int
    payload: bytes
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def key(self) -> tuple[int, int]:
        return (self.client, self.seq)


#: client, seq, options length, function key length, payload length.
_JOB = struct.Struct("!IQHBQ")


#: client, seq, status, payload length, stdout length, stderr length.
_RESULT = struct.Struct("!IQBQII")


def _add_payload(parts: list, payload) -> None:
    """Append a payload to C{parts}: its own parts if it is a L{Segments} (not joined)."""
    if type(payload) is Segments:
        parts += payload.parts
    else:
        parts.append(payload)


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
        _add_payload(parts, job.payload)
    return parts


def first_payload_at(data) -> int | None:
    """
    Where the first job's payload starts in a batch framed by
    L{encode_jobs} whose first bytes are C{data} (a receiver places the
    batch so that it starts aligned), or None if they do not hold its
    header.
    """
    if len(data) < _JOB.size:
        return None
    _, _, olen, flen, _ = _JOB.unpack_from(data, 0)
    return _JOB.size + olen + flen


def job_prefix(job: Job, length: int) -> bytes:
    """
    What comes before C{job}'s payload in its batch alone (L{job_parts}),
    for a payload of C{length} bytes that is not at hand yet: a job whose
    payload is forwarded as it arrives (L{cw.wire.forwarding}).
    """
    parts = job_parts([Job(job.client, job.seq, b"", job.options, job.func)])
    parts[0] = _JOB.pack(job.client, job.seq, len(job.options), len(job.func), length)
    return b"".join(parts)


def decode_jobs(data: bytes) -> list[Job]:
    """Undo L{encode_jobs}; raise L{ValueError} on a malformed batch."""
    jobs = []
    view = memoryview(data)
    whole = type(data) is bytes
    offset, end = 0, len(data)
    # Jobs of a batch mostly share their options and function key: one
    # object each, not one per job (a queued job costs the master less).
    shared: dict[bytes, bytes] = {}
    while offset < end:
        if end - offset < _JOB.size:
            raise ValueError("truncated job record header")
        client, seq, olen, flen, plen = _JOB.unpack_from(data, offset)
        offset += _JOB.size
        if offset + olen + flen + plen > end:
            raise ValueError("truncated job record")
        if whole:  # (slices of bytes are bytes: one object each, no view)
            options = data[offset : offset + olen]
            func = data[offset + olen : offset + olen + flen]
        else:
            options = bytes(view[offset : offset + olen])
            func = bytes(view[offset + olen : offset + olen + flen])
        options = shared.setdefault(options, options)
        func = shared.setdefault(func, func)
        offset += olen + flen
        if whole and plen < VIEW_THRESHOLD:
            payload = data[offset : offset + plen]
        else:
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
        parts.append(_RESULT.pack(r.client, r.seq, r.status, len(r.payload), len(r.stdout), len(r.stderr)))
        _add_payload(parts, r.payload)
        if r.stdout:
            parts.append(r.stdout)
        if r.stderr:
            parts.append(r.stderr)
    return parts


def decode_results(data: bytes) -> list[Result]:
    """Undo L{encode_results}; raise L{ValueError} on a malformed batch."""
    results = []
    view = memoryview(data)
    whole = type(data) is bytes
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _RESULT.size:
            raise ValueError("truncated result record header")
        client, seq, status, plen, olen, elen = _RESULT.unpack_from(data, offset)
        offset += _RESULT.size
        if offset + plen + olen + elen > end:
            raise ValueError("truncated result record")
        if whole and plen < VIEW_THRESHOLD:  # (slices of bytes are bytes: no view)
            payload = data[offset : offset + plen]
        else:
            payload = _piece(view, offset, offset + plen)
        offset += plen
        stdout = bytes(view[offset : offset + olen]) if olen else b""
        offset += olen
        stderr = bytes(view[offset : offset + elen]) if elen else b""
        offset += elen
        results.append(Result(client, seq, status, payload, stdout, stderr))
    return results


def lone_result(first: bytes, total: int) -> tuple[int, int, int] | None:
    """
    The client, seq and status of the one L{Result} of a batch whose
    encoding (L{encode_results}) is C{total} bytes long and starts with
    C{first}; None if C{first} is too short to tell, or the batch holds
    more than one result (or is malformed).  A big result travels alone
    in its batch (L{batches}), so its first chunk says where it goes
    (L{cw.wire.forwarding}).
    """
    if len(first) < _RESULT.size:
        return None
    client, seq, status, plen, olen, elen = _RESULT.unpack_from(first, 0)
    if _RESULT.size + plen + olen + elen != total:
        return None
    return client, seq, status


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
    return _RESULT.size + len(result.payload) + len(result.stdout) + len(result.stderr)


class Stream:
    """What an L{Output} record carries; the first two are the file descriptors."""

    #: Bytes the job wrote to its standard output.
    STDOUT = 1
    #: Bytes the job wrote to its standard error.
    STDERR = 2
    #: A C{logging} record of the job: UTF-8 JSON (L{log_entry}).
    LOG = 3


@dataclass(slots=True)
class Output:
    """
    A piece of what a running job wrote (L{Stream}), sent while it runs to a
    client that asked to see it as it comes (C{echo}, C{forward_logging}).
    """

    client: int
    seq: int
    stream: int
    data: bytes

    @property
    def key(self) -> tuple[int, int]:
        return (self.client, self.seq)


#: client, seq, stream, data length.
_OUTPUT = struct.Struct("!IQBI")

#: Starts every L{Output} record a job process writes on the pipe to its
#: worker (L{output_frames}), so that stray bytes on that pipe are told apart.
OUTPUT_MAGIC = b"\x1ecw"


def encode_outputs(outputs: Iterable[Output]) -> bytes:
    """Frame L{Output} records into one byte string."""
    return b"".join(
        part for o in outputs for part in (_OUTPUT.pack(o.client, o.seq, o.stream, len(o.data)), o.data)
    )


def decode_outputs(data: bytes) -> list[Output]:
    """Undo L{encode_outputs}; raise L{ValueError} on a malformed batch."""
    outputs = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _OUTPUT.size:
            raise ValueError("truncated output record header")
        client, seq, stream, size = _OUTPUT.unpack_from(data, offset)
        offset += _OUTPUT.size
        if offset + size > end:
            raise ValueError("truncated output record")
        outputs.append(Output(client, seq, stream, bytes(data[offset : offset + size])))
        offset += size
    return outputs


def output_size(output: Output) -> int:
    return _OUTPUT.size + len(output.data)


def output_frame(output: Output) -> bytes:
    """One L{Output} record as a job process writes it to its worker (see L{OutputFrames})."""
    return OUTPUT_MAGIC + encode_outputs([output])


class OutputFrames:
    """
    Reads L{output_frame}s from a byte stream that arrives in pieces (a job
    process's pipe to its worker).  Bytes that are not a frame (something
    the job process printed before it caught its output) are handed back
    as text, to be logged.
    """

    #: A frame claiming more data than this is not one.
    MAX_DATA = 64 << 20

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[list[Output], bytes]:
        """Take C{data}; return the records now complete and any stray bytes."""
        buffer = self._buffer
        buffer += data
        outputs: list[Output] = []
        stray = bytearray()
        head = len(OUTPUT_MAGIC) + _OUTPUT.size
        while buffer:
            if not buffer.startswith(OUTPUT_MAGIC):
                at = buffer.find(OUTPUT_MAGIC, 1)
                if at < 0:
                    # Keep a tail that may be the start of the magic.
                    keep = next(
                        (n for n in range(len(OUTPUT_MAGIC) - 1, 0, -1) if buffer.endswith(OUTPUT_MAGIC[:n])),
                        0,
                    )
                    at = len(buffer) - keep
                    if not at:
                        break
                stray += buffer[:at]
                del buffer[:at]
                continue
            if len(buffer) < head:
                break
            client, seq, stream, size = _OUTPUT.unpack_from(buffer, len(OUTPUT_MAGIC))
            if size > self.MAX_DATA or stream not in (Stream.STDOUT, Stream.STDERR, Stream.LOG):
                stray += buffer[:1]
                del buffer[:1]
                continue
            if len(buffer) < head + size:
                break
            outputs.append(Output(client, seq, stream, bytes(buffer[head : head + size])))
            del buffer[: head + size]
        return outputs, bytes(stray)


def log_entry(name: str, level: int, message: str, created: float, exc_text: str = "") -> bytes:
    """The data of a L{Stream.LOG} record: a job's C{logging} record, as UTF-8 JSON."""
    return json.dumps(
        {"name": name, "level": level, "message": message, "created": created, "exc_text": exc_text}
    ).encode("utf-8")


def read_log_entry(data: bytes) -> dict | None:
    """Undo L{log_entry}; None if C{data} is not one."""
    try:
        entry = json.loads(str(data, "utf-8"))
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("level"), int):
        return None
    return entry


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


_KEY = struct.Struct("!IQ")


def encode_keys(keys: Iterable[tuple[int, int]]) -> bytes:
    """Pack job keys C{(client, seq)}."""
    return b"".join(_KEY.pack(client, seq) for client, seq in keys)


def decode_keys(data: bytes) -> list[tuple[int, int]]:
    """Undo L{encode_keys}; raise L{ValueError} on a malformed list."""
    if len(data) % _KEY.size:
        raise ValueError("truncated job key list")
    return [key for key in _KEY.iter_unpack(data)]


#: The key of a client's registration context that asks for L{JobsStarted}.
RUNNING_NOTICES = "running_notices"

#: The key of a client's registration context that says on which machine
#: it runs (L{cw.system.machine_identity}): workers on the same one lend it
#: big results from their memory (L{cw.core.payload.ResultReference}) ...
MACHINE = "machine"

#: The key of a client's registration context that says it keeps each
#: job's argument until the job's result arrives (it resubmits unfinished
#: jobs to a new connection): the master may then let go of a big argument
#: once a worker has it, and fetch it again from the client for a rerun
#: (L{FetchPayload}, L{cw.core.payload.kept_reference}).
KEEPS_ARGUMENTS = "keeps_arguments"

#: ... unless the master sets this key in the context it passes on: it may
#: have to store results for the client (C{--state}), so it needs their bytes.
RESULTS_STORED = "results_stored"

#: The key of a client's registration context that says it acknowledges the
#: results it is sent (L{ResultsTaken}) to a master that keeps a state file
#: and says so (L{SessionJobs}'s C{acks}): that master then keeps each
#: result until acknowledged, for the session's next client should this one
#: die first.
TAKES_RESULTS = "takes_results"


def box_limit(max_payload: int) -> int:
    """Largest AMP box (bytes of values) to accept when payloads may reach C{max_payload}."""
    return max_payload + 2 * BATCH_BYTES


def too_big(what: str, size: int, max_payload: int) -> str:
    """The message for a payload over the master's limit."""
    return f"{what} is {size:,} bytes, over the master's limit of {max_payload:,} (cw-master --max-payload)"


def error_report(kind: str, message: str, traceback: str = "", **extra: Any) -> bytes:
    """
    The JSON payload of a failed L{Result}: C{kind} is a L{ReportKind} or
    the class name of a job's own exception.
    """
    report = {"type": str(kind), "message": message, "traceback": traceback}
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
    return {"type": ReportKind.ERROR.value, "message": repr(payload[:200]), "traceback": ""}
