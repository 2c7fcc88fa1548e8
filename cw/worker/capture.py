"""
What a job writes, caught in its job process (L{OutputCapture}).

A job process points its file descriptors 1 and 2 at two unlinked
temporary files for its whole life, so that everything a job writes to
them is caught: C{print}, C{sys.stderr}, C{os.write(1, ...)}, C extensions
and the subprocesses it starts (which inherit the descriptors).  After each
job, the files are read (the last C{limit} bytes of each, after a marker
saying how much was cut) and emptied: two C{lseek} calls when the job wrote
nothing (about 3 microseconds in all).  The pipes fd 1 and 2 led to before (to the worker) stay open
under other numbers: the worker's log gets what a job process writes
between jobs (L{OutputCapture.stray}) and what cw itself reports there.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import fcntl
import os
import select
import sys
import tempfile

#: The descriptors caught, in the order L{OutputCapture.take} returns them.
STREAMS = (1, 2)


def cut_marker(cut: int, kept: int) -> bytes:
    """The line put in front of output whose first C{cut} bytes were dropped."""
    return b"[cw: %d bytes of earlier output cut; the last %d follow]\n" % (cut, kept)


class OutputCapture:
    """
    Catch fd 1 and 2 of this process (see the module's docstring).

    @param limit: at most this many bytes of each stream come back per job
        (the last ones).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        #: The worker's ends of the pipes that fd 1 and 2 were (to the worker's log).
        self.worker_out = os.dup(1)
        self.worker_err = os.dup(2)
        for fd in STREAMS:
            with tempfile.TemporaryFile(prefix="cw-job-output-") as spool:
                flags = fcntl.fcntl(spool.fileno(), fcntl.F_GETFL)
                # Appending: whoever writes (this process, a subprocess that
                # shares the description) writes at the end, and emptying
                # the file needs no seek.
                fcntl.fcntl(spool.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
                os.dup2(spool.fileno(), fd)
        #: The Python streams over fd 1 and 2, put back after a job that
        #: replaced them.
        self.stdout = sys.stdout
        self.stderr = sys.stderr

    def _flush_python(self) -> None:
        """Write out what Python buffers for fd 1 and 2; undo a job's replacement of sys.stdout/stderr."""
        for current in (sys.stdout, sys.stderr):
            try:
                current.flush()
            except Exception:
                pass  # closed or odd: what it held is lost
        if sys.stdout is not self.stdout:
            sys.stdout = self.stdout
            self._flush_quietly(self.stdout)
        if sys.stderr is not self.stderr:
            sys.stderr = self.stderr
            self._flush_quietly(self.stderr)

    @staticmethod
    def _flush_quietly(stream) -> None:
        try:
            stream.flush()
        except Exception:
            pass

    def _take(self, fd: int) -> bytes:
        # The size, cheaper than fstat (which builds a stat result): the
        # file is appended to, so where its offset stands does not matter.
        size = os.lseek(fd, 0, os.SEEK_END)
        if not size:
            return b""
        if size > self.limit:
            data = cut_marker(size - self.limit, self.limit) + os.pread(fd, self.limit, size - self.limit)
        else:
            data = os.pread(fd, size, 0)
        os.ftruncate(fd, 0)
        return data

    def take(self) -> tuple[bytes, bytes]:
        """What was written to fd 1 and fd 2 since the last call (each bounded); empties both."""
        self._flush_python()
        return self._take(1), self._take(2)

    def stray(self) -> None:
        """
        Pass what was written between jobs (a job's leftover thread, a
        warning logged by the job process) to the worker's log rather than
        to the next job.
        """
        for data in self.take():
            if data:
                self.to_worker_log(data)

    def to_worker_log(self, data: bytes) -> None:
        """Write C{data} to the worker's log (the pipe fd 2 was)."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.worker_err, view)
            except BlockingIOError:
                select.select([], [self.worker_err], [], 1.0)
                continue
            except OSError:
                return  # the worker is gone
            view = view[written:]
