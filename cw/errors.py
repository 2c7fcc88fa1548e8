"""Exceptions that cw raises in client programs."""

from __future__ import annotations

from typing import Any


class CWError(Exception):
    """Base class of cw's own errors."""


class RemoteException(CWError):
    """
    A job failed on a worker.

    C{str()} shows the remote traceback.  Attributes: C{jobid} (the job's id
    as the client knows it), C{type} (the remote exception's class name),
    C{message}, C{traceback} (text), C{host} and C{pid} (where it ran).
    """

    def __init__(self, jobid: Any, report: dict) -> None:
        self.jobid = jobid
        self.report = report
        self.type = report.get("type", "Error")
        self.message = report.get("message", "")
        self.traceback = report.get("traceback", "")
        self.host = report.get("host")
        self.pid = report.get("pid")
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        head = f"job {self.jobid!r} failed{where}"
        if self.traceback:
            return f"{head}; remote traceback:\n{self.traceback.rstrip()}"
        return f"{head}: {self.type}: {self.message}"

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


#: Error report types that have an exception class of their own.
REPORT_TYPES: dict[str, type[RemoteException]] = {"JobTimeout": JobTimeout, "WorkerLost": WorkerLost}


class MasterUnavailable(CWError, ConnectionError):
    """No master answered, or the connection to it was lost."""


class SubmitError(CWError, ValueError):
    """A job could not be submitted (for example, it cannot be pickled)."""
