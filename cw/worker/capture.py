"""
What a job writes, caught in its job process (L{OutputCapture}).

A job process points its file descriptors 1 and 2 at two anonymous
memory files (C{memfd_create}; unlinked temporary files where those cannot
be made) for its whole life, so that everything a job writes to them is
caught: C{print}, C{sys.stderr}, C{os.write(1, ...)}, C extensions and the
subprocesses it starts (which inherit the descriptors).  After each job,
the files are read (the last C{limit} bytes of each, after a marker saying
how much was cut) and emptied: two C{lseek} calls when the job wrote
nothing (about 3 microseconds in all).  Memory files need no room in
C{$TMPDIR} (a full or read-only one cannot make a job's C{print} fail) and
have no name to leave behind, whatever becomes of the process.  While a
job runs, a thread frees what is older than the last C{limit} bytes of
each file every L{TRIM_INTERVAL} seconds (L{OutputCapture.trim}): a job
that writes gigabytes holds little more than C{limit} of memory.  The pipes fd 1 and 2 led to before
(to the worker) stay open under other numbers: the first carries framed
L{Output} notices (L{OutputCapture.notify}: the first, empty, says the
capture is in place; then, for jobs that ask, what they write while they
run, L{Watcher}), the second the worker's log: what a job process writes
between jobs (L{OutputCapture.stray}) and what cw itself reports there.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import sys
import tempfile
import threading
import time

from cw.core.records import Output, Stream, log_entry, output_frame
from cw.system import punch_hole

#: The descriptors caught, in the order L{OutputCapture.take} returns them.
STREAMS = (Stream.STDOUT, Stream.STDERR)

#: Seconds between two notices of a job's output while it runs (L{Watcher}).
INTERVAL = 0.5

#: Longest message (and traceback) of a forwarded logging record, in characters.
LOG_MESSAGE_CHARS = 64_000

#: Seconds between two looks at how much the output files hold (two
#: C{lseek} calls; L{OutputCapture.trim}).
TRIM_INTERVAL = 0.1

#: Bytes beyond the kept C{limit} that a file may hold before they are freed.
TRIM_AT = 1 << 20

#: Granularity of what is freed (whole pages: the rest is kept).
_PAGE = 4096


def open_spool() -> int:
    """
    A new file to catch fd 1 or 2 in: an anonymous memory file, or an
    unlinked temporary file in C{$TMPDIR} where memory files cannot be made.
    """
    try:
        return os.memfd_create("cw-job-output", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        with tempfile.TemporaryFile(prefix="cw-job-output-") as spool:
            return os.dup(spool.fileno())


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
            spool = open_spool()
            try:
                flags = fcntl.fcntl(spool, fcntl.F_GETFL)
                # Appending: whoever writes (this process, a subprocess that
                # shares the description) writes at the end, and emptying
                # the file needs no seek.
                fcntl.fcntl(spool, fcntl.F_SETFL, flags | os.O_APPEND)
                os.dup2(spool, fd)
            finally:
                os.close(spool)
        self._notify_lock = threading.Lock()
        #: Held while a file is emptied or trimmed (the two must not cross).
        self._files_lock = threading.Lock()
        #: Per stream, how many bytes at the start of its file are freed (L{trim}).
        self._freed = [0, 0]
        threading.Thread(target=self._trim_loop, name="cw-output-trim", daemon=True).start()
        #: The Python streams over fd 1 and 2, put back after a job that
        #: replaced them.
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        # Tell the worker, which holds back jobs until then (an empty notice
        # of no job: L{cw.worker.service.JobConnector}).
        self.notify([Output(0, 0, Stream.STDOUT, b"")])

    def flush_python(self) -> None:
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

    def _take(self, index: int, fd: int) -> bytes:
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
        self._freed[index] = 0
        return data

    def take(self) -> tuple[bytes, bytes]:
        """What was written to fd 1 and fd 2 since the last call (each bounded); empties both."""
        self.flush_python()
        with self._files_lock:
            return self._take(0, 1), self._take(1, 2)

    def trim(self) -> bool:
        """
        Free the room of what each file holds before its last C{limit}
        bytes (in whole pages, once that is over L{TRIM_AT}): only those
        are ever read (by L{take}, a L{Watcher}, or the worker once the
        process died).  False if this file cannot free parts of itself.
        """
        with self._files_lock:
            for index, fd in enumerate(STREAMS):
                end = (os.lseek(fd, 0, os.SEEK_END) - self.limit) // _PAGE * _PAGE
                start = self._freed[index]
                if end - start >= TRIM_AT:
                    if not punch_hole(fd, start, end - start):
                        return False
                    self._freed[index] = end
        return True

    def _trim_loop(self) -> None:
        while True:
            time.sleep(TRIM_INTERVAL)
            try:
                if not self.trim():
                    return  # the files grow with what jobs write, as if not trimmed
            except OSError:
                return

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
        _write_all(self.worker_err, data)

    def notify(self, outputs: list[Output]) -> None:
        """Send C{outputs} to the worker now (framed, on the pipe fd 1 was; any thread)."""
        data = b"".join(output_frame(output) for output in outputs)
        with self._notify_lock:
            _write_all(self.worker_out, data)

    def watch(self, client: int, seq: int, echo: bool, level: int | None) -> Watcher:
        """Start sending job C{(client, seq)}'s output as it comes (see L{Watcher})."""
        return Watcher(self, client, seq, echo, level)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return  # the worker is gone
        view = view[written:]


class _Forward(logging.Handler):
    """Keeps the C{logging} records of a job as L{log_entry} data, for its L{Watcher}."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.entries: list[bytes] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()[:LOG_MESSAGE_CHARS]
            exc_text = record.exc_text or ""
            if record.exc_info and not exc_text:
                exc_text = logging.Formatter().formatException(record.exc_info)
            if record.stack_info:
                exc_text = (exc_text + "\n" + record.stack_info).strip()
            entry = log_entry(
                record.name, record.levelno, message, record.created, exc_text[-LOG_MESSAGE_CHARS:]
            )
            self.entries.append(entry)
        except Exception:
            self.handleError(record)

    def take(self) -> list[bytes]:
        entries, self.entries = self.entries, []
        return entries


class Watcher:
    """
    While one job runs, a thread that sends what it writes to its worker
    every L{INTERVAL} seconds: with C{echo}, the new bytes of fd 1 and 2
    (at most the capture's limit of each per turn, the rest skipped with a
    marker), and with a C{level}, the job's C{logging} records at or above
    it (a handler on the root logger for the job's duration).  L{stop}
    sends the rest, before the job's result leaves.
    """

    def __init__(self, capture: OutputCapture, client: int, seq: int, echo: bool, level: int | None) -> None:
        self.capture = capture
        self.client = client
        self.seq = seq
        self.echo = echo
        #: Bytes of fd 1 and 2 sent so far.
        self.sent = [0, 0]
        self.handler: _Forward | None = None
        if level is not None:
            self.handler = _Forward(level)
            root = logging.getLogger()
            self._root_level = root.level
            if root.getEffectiveLevel() > level:
                root.setLevel(level)
            root.addHandler(self.handler)
        if echo:
            # Python's buffer of sys.stdout must reach fd 1 line by line to
            # be seen while the job runs.
            self._line_buffering = capture.stdout.line_buffering
            capture.stdout.reconfigure(line_buffering=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cw-job-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            try:
                self._send()
            except Exception:
                return  # the pipe to the worker is gone: nothing to watch for

    def _send(self) -> None:
        outputs = []
        if self.echo:
            limit = self.capture.limit
            for index, fd in enumerate(STREAMS):
                size = os.lseek(fd, 0, os.SEEK_END)
                start = self.sent[index]
                if size <= start:
                    continue
                if size - start > limit:
                    data = cut_marker(size - limit - start, limit) + os.pread(fd, limit, size - limit)
                else:
                    data = os.pread(fd, size - start, start)
                self.sent[index] = size
                outputs.append(Output(self.client, self.seq, fd, data))
        if self.handler is not None:
            for entry in self.handler.take():
                outputs.append(Output(self.client, self.seq, Stream.LOG, entry))
        if outputs:
            self.capture.notify(outputs)

    def stop(self) -> None:
        """The job ended: stop the thread, send what is left, undo the job's logging handler."""
        self._stop.set()
        self._thread.join()
        if self.handler is not None:
            root = logging.getLogger()
            root.removeHandler(self.handler)
            root.setLevel(self._root_level)
        if self.echo:
            self.capture.flush_python()
            self.capture.stdout.reconfigure(line_buffering=self._line_buffering)
        self._send()
