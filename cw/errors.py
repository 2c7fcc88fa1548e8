"""
Every exception of cw, all deriving from L{CWError} (so that each command
line catches C{CWError} and prints one line), the kinds of error report
cw itself makes (L{ReportKind}), and the typed remote exceptions: a job's
own exception, pickled in its job process (L{exception_fields}) and raised
in the client as an instance of both its class and L{RemoteException}
(L{remote_error}).

The bottom layer: imports nothing of cw.
"""

from __future__ import annotations

import base64
import enum
import threading
import types
from concurrent import futures
from typing import Any

#: A job's exception whose pickle is bigger than this is not sent; the
#: client gets a plain L{RemoteException} (with the traceback text).
EXCEPTION_PICKLE_LIMIT = 1 << 20


class CWError(Exception):
    """Base class of cw's own errors."""


class ReportKind(str, enum.Enum):
    """
    The C{type} of each error report cw itself makes, rather than a job's
    own exception (reported under its class's name).  The values are the
    strings on the wire (L{cw.core.records.error_report}); being strings,
    members compare equal to them.
    """

    #: The job was running on workers lost as many times as it may be attempted.
    WORKER_LOST = "WorkerLost"
    #: The job ran past its timeout, as many times as it may be attempted.
    JOB_TIMEOUT = "JobTimeout"
    #: The job's process died (signal, exit) while running it.
    JOB_PROCESS_DIED = "JobProcessDied"
    #: The job or its result is over the master's C{--max-payload}.
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    #: The job names a function its client did not define on its connection.
    UNKNOWN_FUNCTION = "UnknownFunction"
    #: No connected worker could run the job for --unschedulable-timeout.
    UNSCHEDULABLE = "Unschedulable"
    #: The job's client and the worker run incompatible Python or cloudpickle versions.
    INCOMPATIBLE_WORKER = "IncompatibleWorker"
    #: The job's client had a job with its number queued or running already.
    DUPLICATE_JOB = "DuplicateJob"
    #: The job's argument, left in its client's memory (a reference), could
    #: not be read: the client is gone or could not send it.
    ARGUMENT_UNAVAILABLE = "ArgumentUnavailable"
    #: A report that could not be read (or has no type).
    ERROR = "Error"

    def __str__(self) -> str:
        return self.value


class RemoteException(CWError):
    """
    A job failed on a worker.

    C{str()} shows the remote traceback.  Attributes: C{jobid} (the job's id
    as the client knows it), C{type} (the remote exception's class name),
    C{message}, C{traceback} (text), C{host} and C{pid} (where it ran),
    C{stdout} and C{stderr} (text: what the job wrote before it failed,
    the last megabyte of each).

    A job's own exception is raised as an instance of both its class and
    this one (see L{remote_error}): C{except ZeroDivisionError} and C{except
    RemoteException} both catch it.  When that cannot be done, the client
    gets a plain C{RemoteException} whose C{fallback} says why (else None).
    """

    def __init__(self, jobid: Any, report: dict) -> None:
        self._set_report(jobid, report)
        super().__init__(str(self))

    def _set_report(self, jobid: Any, report: dict) -> None:
        fields = {
            "jobid": jobid,
            "report": report,
            "type": report.get("type", ReportKind.ERROR.value),
            "message": report.get("message", ""),
            "traceback": report.get("traceback", ""),
            "host": report.get("host"),
            "pid": report.get("pid"),
            "fallback": report.get("exception_error") or None,
            "stdout": report.get("stdout", ""),
            "stderr": report.get("stderr", ""),
        }
        for name, value in fields.items():
            try:
                setattr(self, name, value)
            except AttributeError:
                # A read-only attribute of the job's exception class (an
                # ExceptionGroup's message): the class's own value stays.
                pass

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        head = f"job {self.jobid!r} failed{where}"
        if self.traceback:
            text = f"{head}; remote traceback:\n{self.traceback.rstrip()}"
        else:
            text = f"{head}: {self.type}: {self.message}"
        if self.fallback:
            text += f"\n(raised as RemoteException, not as {self.type}: {self.fallback})"
        return text

    def __reduce__(self):
        return (type(self), (self.jobid, self.report))


class JobCrashed(RemoteException):
    """The job's process died (signal, exit) while running the job."""


class JobTimeout(RemoteException):
    """
    The job ran longer than its timeout and its process was killed.
    C{report["timeout"]} is the timeout in seconds.
    """


class WorkerLost(JobCrashed):
    """
    The job was running on workers that were lost (killed, disconnected,
    silent) as many times as it may be attempted.  C{report["hosts"]} lists
    the workers and C{report["attempts"]} counts them.
    """


class Unschedulable(RemoteException):
    """
    No connected worker could run the job (it asked for more cores,
    memory, GPUs or custom resources than any has, or a tag none has) for
    the master's C{--unschedulable-timeout}.  C{report["resources"]} says
    what it asked for.
    """


class IncompatibleWorker(RemoteException):
    """
    The job was sent to a worker whose Python (major.minor, implementation)
    or cloudpickle (major) version differs from the client's, so it was not
    run there: C{str()} names both versions and the worker.  Clients built
    with C{version_mismatch="avoid"} are never sent to such workers.
    C{report["client_versions"]} and C{report["worker_versions"]} hold both.
    """


#: Error report types that have an exception class of their own.
REPORT_TYPES: dict[str, type[RemoteException]] = {
    ReportKind.JOB_TIMEOUT: JobTimeout,
    ReportKind.WORKER_LOST: WorkerLost,
    ReportKind.UNSCHEDULABLE: Unschedulable,
    ReportKind.INCOMPATIBLE_WORKER: IncompatibleWorker,
}


class JobKilled(CWError, futures.CancelledError):
    """
    The job was running when the client killed it
    (L{cw.client.ClusterExecutor.kill}).  A L{futures.CancelledError}, so
    code that handles cancelled futures handles it too.
    """


class JobDetached(CWError):
    """
    The job was left with the master (L{ClusterExecutor.detach}): this
    future will not get its result; a client of the same session does.
    """


class MasterUnavailable(CWError, ConnectionError):
    """No master answered, or the connection to it was lost."""


class SubmitError(CWError, ValueError):
    """A job could not be submitted (for example, it cannot be pickled)."""


# -- typed remote exceptions ------------------------------------------------


def exception_fields(exc: BaseException) -> dict[str, str]:
    """
    The fields a job process adds to the error report of a job that raised
    C{exc}: C{{"exception": base64 of a cloudpickle}} of its class, its
    constructor arguments and its state (classes defined in the client's
    C{__main__} travel by value), or C{{"exception_error": why not}}.

    The instance itself is not pickled: unpickling it would call its
    class's C{__init__}, which may require other arguments than the
    exception's C{args} (see L{remote_error}).
    """
    import cloudpickle  # here, not at the top: see L{remote_error}

    cls = type(exc)
    if not isinstance(exc, Exception):
        return {"exception_error": f"{cls.__name__} is not an Exception; cw does not raise it in the client"}
    try:
        reduced = exc.__reduce_ex__(4)
    except Exception as e:
        return {"exception_error": f"it cannot be reduced for pickling ({type(e).__name__}: {e})"}
    if isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is cls:
        args, state = reduced[1], reduced[2] if len(reduced) > 2 else None
    else:
        args, state = exc.args, dict(getattr(exc, "__dict__", {})) or None
    why = ""
    for candidate in ((cls, args, state), (cls, args, None)) if state is not None else ((cls, args, None),):
        try:
            data = cloudpickle.dumps(candidate)
            break
        except Exception as e:
            why = why or f"it cannot be pickled ({type(e).__name__}: {e})"
    else:
        return {"exception_error": why}
    if len(data) > EXCEPTION_PICKLE_LIMIT:
        return {"exception_error": f"its pickle is {len(data):,} bytes, over {EXCEPTION_PICKLE_LIMIT:,}"}
    return {"exception": base64.b64encode(data).decode("ascii")}


_typed_lock = threading.Lock()
#: Classes made by L{typed_class}, by the job's exception class; a class
#: that cannot be made maps to the reason (a string).
_typed: dict[type, type | str] = {}


def _typed_reduce(self):
    return (remote_error, (self.jobid, self.report))


def typed_class(cls: type) -> type:
    """
    A subclass of both L{RemoteException} and C{cls}, made once per class
    (as Ray's C{RayTaskError(cls)}).  Raises L{TypeError} if C{cls} cannot
    be subclassed so.
    """
    with _typed_lock:
        made = _typed.get(cls)
        if made is None:
            module = "" if cls.__module__ == "builtins" else f"{cls.__module__}."
            name = f"RemoteException({module}{cls.__qualname__})"
            try:
                namespace = {"__module__": __name__, "__reduce__": _typed_reduce}
                made = type(name, (RemoteException, cls), namespace)
            except Exception as e:
                made = f"its class cannot be subclassed ({type(e).__name__}: {e})"
            _typed[cls] = made
    if isinstance(made, str):
        raise TypeError(made)
    return made


def _builtin_init(cls: type):
    """The C{__init__} of C{cls}'s nearest built-in base (never the user's own)."""
    for klass in cls.__mro__:
        if klass.__module__ == "builtins" and "__init__" in vars(klass):
            return klass.__init__
    return BaseException.__init__


def _constructor(typed: type) -> Any:
    """
    The C{__new__} that calling C{typed} would run.  Looked up by name, a
    built-in class's C{__new__} (C{MemoryError}'s) may be one Python calls
    unsafe for C{typed}, whose layout comes from its first base
    (L{RemoteException}); then the C{__new__} of the nearest built-in class
    that C{typed}'s layout derives from is the one C{typed()} uses.
    """
    new = typed.__new__
    if not isinstance(new, types.BuiltinFunctionType):
        return new  # a Python __new__ of the job's class
    klass = typed
    while klass.__flags__ & _HEAP_TYPE and "__new__" not in vars(klass):
        klass = klass.__base__
    return klass.__new__


#: C{Py_TPFLAGS_HEAPTYPE}: set on classes made by class statements, not on built-in ones.
_HEAP_TYPE = 1 << 9


def _rebuild(cls: Any, args: tuple, state: Any, jobid: Any, report: dict) -> RemoteException | str:
    """The typed exception for L{remote_error}, or why it cannot be made."""
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return f"{cls!r} is not an exception class"
    try:
        typed = typed_class(cls)
    except TypeError as e:
        return str(e)
    try:
        error = _constructor(typed)(typed, *args)
        _builtin_init(cls)(error, *args)
        if state:
            error.__setstate__(state)
    except Exception as e:
        return f"it cannot be rebuilt in the client ({type(e).__name__}: {e})"
    error._set_report(jobid, report)
    return error


def remote_error(
    jobid: Any, report: dict, default: type[RemoteException] = RemoteException
) -> RemoteException:
    """
    The exception to raise in the client for a failed job's C{report}.

    With the job's pickled exception (L{exception_fields}): an instance of
    a class made from L{RemoteException} and the job's exception class
    (L{typed_class}), with the exception's C{args} and state, built
    without calling its class's C{__init__} (which may need arguments its
    C{args} do not hold).  Otherwise, or when the class cannot be unpickled
    here or subclassed, a C{default} instance whose C{fallback} says why.
    """
    data = report.get("exception")
    if data is None:
        return default(jobid, report)
    # Imported here, not at the top: C{import cw} imports this module
    # (through cw.core.records) and must stay light; cloudpickle (which
    # loads pickle, dis, inspect, ...) is needed only for a job's exception.
    import cloudpickle

    try:
        cls, args, state = cloudpickle.loads(base64.b64decode(data))
        args = tuple(args)
    except Exception as e:
        why = f"it cannot be unpickled in the client ({type(e).__name__}: {e})"
    else:
        error = _rebuild(cls, args, state, jobid, report)
        if not isinstance(error, str):
            return error
        why = error
    report = {key: value for key, value in report.items() if key != "exception"}
    return default(jobid, {**report, "exception_error": why})


class VersionMismatch(CWError):
    """The peer speaks another protocol version."""


class VersionConflict(CWError):
    """
    Workers run other versions of Python, cloudpickle or named packages
    than the client (L{cw.client.ClusterExecutor.versions} with
    C{check=True}); the message lists every difference.
    """


class AuthenticationFailed(CWError):
    """The other side does not hold the same secret (or refused to check)."""


class BadCommand(CWError):
    """A field of a command from an authenticated peer is malformed."""


class SharedMemoryRefused(CWError):
    """
    A job process could not open the memory file its worker put a payload
    in (L{cw.worker.shared}); the worker then sends it through the pipe.
    """


class PayloadUnavailable(CWError):
    """
    A client was asked for a job argument it left in its memory
    (L{cw.wire.commands.FetchPayload}) and no longer holds it (the job
    ended or was cancelled meanwhile).
    """


class SecretError(CWError):
    """A secret file (the shared secret, the dashboard token) is missing, unsafe or unusable."""


class OptionError(CWError, ValueError):
    """A command-line option of a role is unknown or has a bad value."""


class ClusterError(CWError):
    """The local cluster could not be started or stopped."""


class SlurmError(CWError):
    """SLURM could not do what cw asked."""


class StateFileError(CWError):
    """The master's state file (C{--state}) cannot be opened, read or written."""
