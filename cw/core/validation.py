"""
Checks on every field an authenticated peer sends the master.

Authentication proves that a peer holds the secret, not that it is bug-free
or of the same version: a malformed field must end that one connection with
one clear log line, never an unhandled error deep inside the master.  Each
check here raises L{BadCommand} naming the field and what was wrong; the
master's protocol (L{cw.master.protocol.MasterProtocol}) turns that into a dropped
connection.  Pure functions, no I/O: unit-tested in
L{cw.test.master.test_limits}.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import json
from typing import Any

from cw.core import records as P
from cw.errors import BadCommand

#: Largest share weight a client may ask for.
MAX_WEIGHT = 1000

#: Most job slots one worker may declare.
MAX_SLOTS = 1 << 16

#: Longest host name, working directory or C{sys.path} entry accepted.
MAX_NAME = 255
MAX_PATH = 4096

#: Most C{sys.path} entries in a client's context.
MAX_PATH_ENTRIES = 10_000

#: Most workers a client may wait for (L{P.AwaitWorkers}).
MAX_AWAIT = 1_000_000

#: Longest key of a cached function (the job record's field holds 255).
MAX_FUNCTION_KEY = 255

#: Longest client session name (L{P.RegisterClient}).
MAX_SESSION = 128

#: The status codes a result may carry.
OUTCOMES = frozenset({P.Outcome.OK, P.Outcome.RAISED, P.Outcome.CRASHED, P.Outcome.FAILED})


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(name: str, value: Any, low: int, high: int) -> int:
    """C{value} if it is an integer in C{[low, high]}, else L{BadCommand}."""
    if not _integer(value) or not low <= value <= high:
        raise BadCommand(f"{name} must be an integer from {low} to {high}, not {value!r:.80}")
    return value


def check_text(name: str, value: Any, limit: int, empty: bool = False, printable: bool = True) -> str:
    """
    C{value} if it is a string of at most C{limit} characters, all
    printable unless C{printable} is false (a directory may be named with
    anything, but a name that is logged may not forge log lines).
    """
    if not isinstance(value, str):
        raise BadCommand(f"{name} must be a string, not {type(value).__name__}")
    if len(value) > limit or (not value and not empty):
        raise BadCommand(f"{name} must be 1 to {limit} characters long, not {len(value)}")
    if printable and not value.isprintable():
        raise BadCommand(f"{name} holds control characters: {value!r:.80}")
    return value


def check_session(session: Any) -> str:
    """A client's session name: 1 to L{MAX_SESSION} printable characters."""
    return check_text("session", session, MAX_SESSION)


def check_peer(host: Any, pid: Any) -> str:
    """The C{host:pid} name of a registering peer."""
    check_text("host", host, MAX_NAME)
    check_range("pid", pid, 1, (1 << 32) - 1)
    return f"{host}:{pid}"


def check_context(context: Any) -> int:
    """
    Check a client's context (working directory, C{sys.path}, share weight;
    other keys are passed on untouched) and return its weight.
    """
    if not isinstance(context, dict):
        raise BadCommand(f"context must be a JSON object, not {type(context).__name__}")
    check_text("context cwd", context.get("cwd"), MAX_PATH, printable=False)
    path = context.get("path")
    if not isinstance(path, list) or len(path) > MAX_PATH_ENTRIES:
        raise BadCommand(f"context path must be a list of at most {MAX_PATH_ENTRIES:,} strings")
    for entry in path:
        check_text("context path entry", entry, MAX_PATH, empty=True, printable=False)
    return check_range("context weight", context.get("weight", 1), 1, MAX_WEIGHT)


def check_jobs(jobs: list[P.Job]) -> None:
    """Check the options of each submitted job (framing was checked on decoding)."""
    for job in jobs:
        if job.seq < 1:
            raise BadCommand(f"job {job.seq}: sequence numbers start at 1")
        if not job.options:
            continue
        try:
            options = json.loads(bytes(job.options).decode("utf-8"))
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise BadCommand(f"job {job.seq}: options are not a JSON object")
        timeout = options.get("timeout")
        if timeout is not None and not P.valid_timeout(timeout):
            raise BadCommand(f"job {job.seq}: timeout must be positive seconds, not {timeout!r:.40}")
        # Any integer the client accepts (see cw.client.session.job_options).
        attempts = options.get("max_attempts")
        if attempts is not None and (not _integer(attempts) or attempts < 1):
            raise BadCommand(f"job {job.seq}: max_attempts must be a positive integer, not {attempts!r:.40}")
        priority = options.get("priority")
        if priority is not None and not _integer(priority):
            raise BadCommand(f"job {job.seq}: priority must be an integer, not {priority!r:.40}")


def check_results(results: list[P.Result]) -> None:
    """Check the status of each result a worker reports."""
    for result in results:
        if result.status not in OUTCOMES:
            raise BadCommand(f"result of job {result.key}: unknown status {result.status}")


def check_function_key(key: Any) -> bytes:
    if not isinstance(key, bytes) or not 1 <= len(key) <= MAX_FUNCTION_KEY:
        raise BadCommand(f"a function key must be 1 to {MAX_FUNCTION_KEY} bytes")
    return key
