"""
L{ClientThread}: the original callback-style client (results delivered on a
thread of its own) over a L{cw.client.session.Session}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cw.client.executor import _refuse_after_interpreter_exit
from cw.client.mapping import Progress
from cw.client.mapping import progress as progress
from cw.client.session import Session, _Jobs, decode_result, job_options, log, pickle_call
from cw.discovery import default_host
from cw.wire import commands as P


class ClientThread(threading.Thread):
    """
    Submit jobs and get C{callback(jobid, result)} for each success.

    Use as a context manager (enter starts, exit waits) or call C{start()},
    C{submit(...)} and C{wait()}.  Callbacks run in this thread, one at a
    time.  A failed job is not given to the callback: C{wait()} raises it as
    L{RemoteException} once every job has finished.

    @param host: the master (a host name, C{HOST:PORT} or an endpoint
        description); default: the SLURM master when SLURM is in use, else
        C{localhost}.
    @param master_timeout: as for L{ClusterExecutor}; C{wait()} then
        raises L{MasterUnavailable}.
    """

    def __init__(
        self,
        callback: Callable[[Any, Any], Any] | None = None,
        host: str | None = None,
        port: int = P.PORT,
        connect_timeout: float | None = None,
        secret_file: str | None = None,
        insecure: bool | None = None,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        progress: bool | dict = False,
        weight: int = 1,
        master_timeout: float | None = None,
    ) -> None:
        super().__init__(name="cw-client", daemon=True)
        #: A tqdm bar over submitted and finished jobs, if asked for.
        self._progress = Progress(progress, 0)
        #: Defaults for every job of this client (see L{submit_with}).
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.callback = callback
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self._auth = {
            "secret_file": secret_file,
            "insecure": insecure,
            "weight": weight,
            "master_timeout": master_timeout,
        }
        self.session: Session | None = None
        self._jobs = _Jobs()
        self._failures: list[BaseException] = []
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Connect to the master (raising L{MasterUnavailable}) and start."""
        with self._start_lock:
            if self.session is not None:
                return
            self.session = Session(
                default_host(self.host),
                self.port,
                self._jobs.inbox.put,
                self._jobs.inbox.put,
                self.connect_timeout,
                **self._auth,
            )
            super().start()

    def submit(self, jobid: Any, func: Callable, *args: Any, **kwargs: Any) -> None:
        """Queue C{func(*args, **kwargs)} under C{jobid}; returns at once."""
        self.submit_with(jobid, func, args, kwargs)

    def submit_with(
        self,
        jobid: Any,
        func: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        priority: int | None = None,
    ) -> None:
        """
        Like L{submit}, with options for this job: C{timeout} overrides the
        client's default (see L{ClusterExecutor.submit_with}), as do
        C{max_attempts} and C{priority}.
        """
        _refuse_after_interpreter_exit()
        payload = pickle_call(jobid, func, tuple(args), dict(kwargs or {}))
        options = job_options(self, timeout, max_attempts, priority)
        if self.session is None:
            self.start()
        self.session.wait_for_room()
        seq = self._jobs.add(jobid)
        self._progress.grow()
        try:
            self.session.send(P.Job(0, seq, payload, options), jobid)
        except BaseException:
            self._jobs.forget(seq)
            raise

    def run(self) -> None:
        inbox = self._jobs.inbox
        while True:
            item = inbox.get()
            if item is None:
                return
            if isinstance(item, Exception):
                self._fail_all(item)
                continue
            for result in item:
                jobid = self._jobs.take(result.seq)
                if jobid is None:
                    continue
                ok, value = decode_result(jobid, result)
                self._completed(jobid, ok, value)
                self._progress.tick(failed=not ok)
                self._jobs.done(result.seq)

    def _completed(self, jobid: Any, ok: bool, value: Any) -> None:
        """A job ended: give a success to the callback, keep a failure for L{wait}."""
        if ok and self.callback is not None:
            try:
                self.callback(jobid, value)
            except BaseException as e:
                log.failure("callback for job {jobid!r} raised", jobid=jobid)
                self._failures.append(e)
        elif not ok:
            self._failures.append(value)

    def _fail_all(self, exc: Exception) -> None:
        with self._jobs.lock:
            if self._jobs.entries:
                self._failures.append(exc)
            self._jobs.entries.clear()
            self._jobs.idle.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """
        Block until every submitted job has finished and its callback ran.
        Raise the first failure (L{RemoteException}, L{MasterUnavailable} or
        an exception from the callback); the others are logged.
        """
        if not self._jobs.wait_idle(timeout):
            raise TimeoutError(f"{self._jobs.outstanding()} jobs still running after {timeout} s")
        if self._failures:
            first, rest = self._failures[0], self._failures[1:]
            self._failures = []
            if rest:
                log.warn("{n} more jobs failed besides {first}", n=len(rest), first=first)
            raise first

    def close(self) -> None:
        """Disconnect from the master and stop this thread."""
        self._progress.close()
        if self.session is not None:
            self.session.close()
            self._jobs.inbox.put(None)

    def __enter__(self) -> ClientThread:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.close()


class Client:
    """
    The original's connection half of L{BaseClientThread}, kept for programs
    that name or subclass it: C{host}, C{port}, and C{connection_ready()},
    called once the master has registered the connection (override it).
    """

    def __init__(self, host: str | None = None, port: int = P.PORT) -> None:
        self.host = host
        self.port = port

    def connection_ready(self) -> None:
        """Called once connected to the master; does nothing unless overridden."""


class BaseClientThread(ClientThread, Client):
    """
    The original's lower-level client thread: C{callback(jobid, success,
    result)} runs in this thread for every job, successful or not (for a
    failed job, C{result} is its exception, a L{RemoteException}, and
    C{wait()} does not raise it again); C{start_job(jobid, func, *args,
    **kwargs)} submits, C{stop()} disconnects.  A thin layer over
    L{ClientThread}, which takes the same keyword options.
    """

    def __init__(
        self,
        callback: Callable[[Any, bool, Any], Any],
        host: str | None = None,
        port: int = P.PORT,
        **options,
    ) -> None:
        ClientThread.__init__(self, None, host, port, **options)
        self.job_callback = callback

    def start(self) -> None:
        started = self.session is not None
        super().start()
        if not started:
            self.connection_ready()

    def _completed(self, jobid: Any, ok: bool, value: Any) -> None:
        try:
            self.job_callback(jobid, ok, value)
        except BaseException as e:
            log.failure("callback for job {jobid!r} raised", jobid=jobid)
            self._failures.append(e)

    def start_job(self, jobid: Any, func: Callable, *args: Any, **kwargs: Any) -> None:
        """Submit C{func(*args, **kwargs)} under C{jobid} (the original's name for L{submit})."""
        self.submit(jobid, func, *args, **kwargs)

    def stop(self) -> None:
        """Disconnect (the original's name for L{close})."""
        self.close()
