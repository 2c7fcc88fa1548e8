"""
The job process: an ampoule child that runs one job at a time.

Each job runs in its client's working directory with the client's
C{sys.path} entries in front of the child's own.  The payload is opened
here, and only here: the worker and master never unpickle user data.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import cloudpickle
from ampoule.child import AMPChild

from cw import protocol as P

_inserted: list[str] = []


def enter_context(cwd: str, path: list[str]) -> None:
    """Make C{cwd} the working directory and put C{path} in front of sys.path."""
    global _inserted
    if _inserted != path:
        for entry in _inserted:
            try:
                sys.path.remove(entry)
            except ValueError:
                pass
        fresh = [p for p in path if p not in sys.path]
        sys.path[:0] = fresh
        _inserted = fresh
    if cwd and os.getcwd() != cwd:
        os.chdir(cwd)


def run_payload(cwd: str, path: list[str], payload: bytes) -> tuple[int, bytes]:
    """
    Run a cloudpickled C{(func, args, kwargs)} and return an L{P.Outcome}
    code with its payload: the cloudpickled value, or a JSON error report
    carrying the remote traceback.
    """
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        enter_context(cwd, path)
    except OSError as e:
        return P.Outcome.FAILED, P.error_report(
            type(e).__name__,
            f"cannot enter the client's working directory {cwd!r} on"
            f" {where['host']}: {e}; run workers on a machine that shares"
            " the client's filesystem",
            **where,
        )
    try:
        func, args, kwargs = cloudpickle.loads(payload)
    except BaseException as e:
        return P.Outcome.RAISED, P.error_report(
            type(e).__name__,
            f"the job could not be unpickled on {where['host']}: {e}",
            traceback.format_exc(),
            **where,
        )
    try:
        value = func(*args, **kwargs)
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(e), e, tb))
        return P.Outcome.RAISED, P.error_report(type(e).__name__, str(e), text, **where)
    try:
        return P.Outcome.OK, cloudpickle.dumps(value)
    except BaseException as e:
        return P.Outcome.RAISED, P.error_report(
            type(e).__name__,
            f"the job's return value ({type(value).__name__}) could not be pickled: {e}",
            traceback.format_exc(),
            **where,
        )


class JobChild(AMPChild):
    """
    The ampoule child class that workers start; answers L{P.RunJob}.

    @param memory_limit: the process's address-space limit in bytes
        (C{RLIMIT_AS}; a decimal string, as ampoule passes it), "0" for none.
    """

    def __init__(self, memory_limit: str = "0") -> None:
        super().__init__()
        limit = int(memory_limit)
        if limit > 0:
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    @P.RunJob.responder
    def run_job(self, cwd, path, payload):
        status, data = run_payload(cwd, path, payload)
        return {"status": status, "payload": data}
