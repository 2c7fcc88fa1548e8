"""
L{ClientThread}: the original callback-style client (results delivered on a
thread of its own), a thin layer over a L{ClusterExecutor}: the executor's
delivery thread puts each job's outcome on this thread's queue, and this
thread runs the callbacks.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

from cw.client.executor import ClusterExecutor, _refuse_after_interpreter_exit
from cw.client.mapping import Progress
from cw.client.mapping import progress as progress
from cw.client.session import (
    NO_OUTPUT,
    RECONNECT_TIMEOUT,
    JobOutput,
    job_options,
    log,
    logging_level,
    session_name,
)
from cw.errors import RemoteException
from cw.wire import commands as P


def takes_output(callback: Callable | None) -> bool:
    """
    Whether C{callback} can be called with three positional arguments
    C{(jobid, result, output)} rather than two (looked at once, when a
    L{ClientThread} is made).
    """
    if callback is None:
        return False
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):  # a builtin without a signature: the original two
        return False
    try:
        signature.bind(None, None, None)
    except TypeError:
        return False
    try:
        signature.bind(None, None)
    except TypeError:
        return True
    # Both fit (a third parameter with a default, or *args): pass the
    # output only to a callback that names a third positional parameter.
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 3


class _Job:
    """
    A L{ClientThread}'s job in its executor's table (see
    L{cw.client.executor._Jobs}): instead of a future (about 2 KB each,
    which a client that queues a million jobs would feel), its outcome goes
    straight to the L{ClientThread}'s queue.
    """

    __slots__ = ("_jobid", "_put")

    def __init__(self, put: Callable[[tuple], None], jobid: Any) -> None:
        self._put = put
        self._jobid = jobid

    def _attach(self, executor: ClusterExecutor, seq: int) -> Any:
        return self._jobid

    def _start(self) -> None:
        pass

    def _finish(self, ok: bool, value: Any, output: JobOutput = NO_OUTPUT) -> None:
        self._put((self._jobid, ok, value, output))


class _ThreadExecutor(ClusterExecutor):
    """
    The executor under a L{ClientThread}: no running notices (a
    L{ClientThread} never shows a running job, so the master is not asked
    for them: fewer messages) and
    no wait at interpreter exit (a L{ClientThread} is a daemon thread whose
    jobs end with the program unless it calls C{wait()}).
    """

    _running_notices = False
    _wait_at_exit = False

    def _echo_label(self, entry: Any) -> str:
        return f"#{entry._jobid}"


class ClientThread(threading.Thread):
    """
    Submit jobs and get C{callback(jobid, result)} for each success.

    Use as a context manager (enter starts, exit waits) or call C{start()},
    C{submit(...)} and C{wait()}.  Callbacks run in this thread, one at a
    time.  A failed job is not given to the callback: C{wait()} raises it as
    L{RemoteException} (whose C{stdout} and C{stderr} hold what the job
    wrote) once every job has finished.  A callback that takes a third
    argument, C{callback(jobid, result, output)}, gets the job's
    L{JobOutput} there (C{output.stdout}, C{output.stderr}).

    @param host: the master (a host name, C{HOST:PORT} or an endpoint
        description); default: the SLURM master when SLURM is in use, else
        C{localhost}.
    @param master_timeout: as for L{ClusterExecutor}, as are the other
        connection options (C{version_mismatch} among them); C{wait()} then
        raises L{MasterUnavailable}.
    @param session: as for L{ClusterExecutor}.
    @param echo: write what the jobs write to this process's standard
        output and error as it comes, each line prefixed with the job's id
        and host (C{[#jobid node7] ...}), as L{ClusterExecutor} does.
    @param forward_logging: hand the jobs' C{logging} records at or above
        this level to this process's C{logging} (under C{cw.job.<name>}).
    @param reconnect_timeout: as for L{ClusterExecutor}: jobs outlive a
        master restart within this many seconds (default 300); C{wait()}
        raises L{MasterUnavailable} only after it.
    """

    def __init__(
        self,
        callback: Callable[..., Any] | None = None,
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
        session: str | None = None,
        version_mismatch: str = "error",
        echo: bool = False,
        forward_logging: int | str | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        super().__init__(name="cw-client", daemon=True)
        logging_level(forward_logging)  # a bad level fails here, not at the first submit
        self.echo = echo
        self.forward_logging = forward_logging
        #: A tqdm bar over submitted and finished jobs, if asked for.
        self._progress = Progress(progress, 0)
        #: Defaults for every job of this client (see L{submit_with}).
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.callback = callback
        #: Whether C{callback} takes the job's output as a third argument.
        self._with_output = takes_output(callback)
        self.host = host
        self.port = port
        #: L{ClusterExecutor}'s connection options, for L{start}.
        self._connection = {
            "connect_timeout": connect_timeout,
            "secret_file": secret_file,
            "insecure": insecure,
            "weight": weight,
            "master_timeout": master_timeout,
            "reconnect_timeout": reconnect_timeout,
            # Chosen now, so that it is known (and kept) before start().
            "session": session_name(session),
            "version_mismatch": version_mismatch,
        }
        self._executor: ClusterExecutor | None = None
        #: C{(jobid, ok, value)} of finished jobs, put by the executor's
        #: delivery thread; None ends this thread.
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        #: One bound method for all the jobs' entries (not one each).
        self._put_done = self._done.put
        #: Jobs submitted and not yet delivered, under L{_idle}'s lock.
        self._outstanding = 0
        self._idle = threading.Condition()
        self._failures: list[BaseException] = []
        #: The last connection failure recorded: every outstanding future
        #: fails with the same one, which L{wait} raises once.
        self._lost: BaseException | None = None
        self._start_lock = threading.Lock()

    @property
    def session_name(self) -> str:
        """This client's session name (the C{session} it was given, or a generated one)."""
        return self._connection["session"]

    @property
    def session(self):
        """The L{Session} with the master once started, else None."""
        return None if self._executor is None else self._executor.session

    def start(self) -> None:
        """Connect to the master (raising L{MasterUnavailable}) and start."""
        with self._start_lock:
            if self._executor is not None:
                return
            self._executor = _ThreadExecutor(self.host, self.port, **self._connection)
            super().start()

    def status(self) -> dict:
        """
        As L{ClusterExecutor.status}: the master's status with this client's
        C{connection} (C{"connected"}, C{"reconnecting"} or C{"lost"}).
        """
        if self._executor is None:
            return {"connection": "not started", "session": self.session_name}
        return self._executor.status()

    def submit(self, jobid: Any, func: Callable, *args: Any, **kwargs: Any) -> None:
        """Queue C{func(*args, **kwargs)} under C{jobid}; returns at once."""
        self.submit_with(jobid, func, args, kwargs)

    def submit_with(
        self,
        jobid: Any,
        func: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        **options: Any,
    ) -> None:
        """
        Like L{submit}, with options for this job: C{timeout} overrides the
        client's default (see L{ClusterExecutor.submit_with}), as do
        C{max_attempts}, C{priority}, C{expected_duration}, C{echo},
        C{forward_logging}, C{resources}, C{tags} and C{env}.
        """
        _refuse_after_interpreter_exit()
        options = job_options(self, **options)
        if self._executor is None:
            self.start()
        payload, func = self._executor._pickle(jobid, func, tuple(args), dict(kwargs or {}))
        with self._idle:
            self._outstanding += 1
        self._progress.grow()
        try:
            self._executor._send(
                lambda seq: P.Job(0, seq, payload, options, func), _Job(self._put_done, jobid)
            )
        except BaseException:
            self._delivered()
            raise

    def run(self) -> None:
        while (item := self._done.get()) is not None:
            self._finished(*item)
            item = None  # a big result is not kept until the next one

    def _finished(self, jobid: Any, ok: bool, value: Any, output: JobOutput) -> None:
        """Deliver one finished job: to the callback, or to the failures L{wait} raises."""
        try:
            if ok or isinstance(value, RemoteException):  # the job's own outcome
                self._completed(jobid, ok, value, output)
                self._progress.tick(failed=not ok)
            elif value is not self._lost:  # the connection: once for all its jobs
                self._lost = value
                self._failures.append(value)
        finally:
            self._delivered()

    def _delivered(self) -> None:
        with self._idle:
            self._outstanding -= 1
            if not self._outstanding:
                self._idle.notify_all()

    def _completed(self, jobid: Any, ok: bool, value: Any, output: JobOutput) -> None:
        """A job ended: give a success to the callback, keep a failure for L{wait}."""
        if ok and self.callback is not None:
            try:
                if self._with_output:
                    self.callback(jobid, value, output)
                else:
                    self.callback(jobid, value)
            except BaseException as e:
                log.failure("callback for job {jobid!r} raised", jobid=jobid)
                self._failures.append(e)
        elif not ok:
            self._failures.append(value)

    def wait(self, timeout: float | None = None) -> None:
        """
        Block until every submitted job has finished and its callback ran.
        Raise the first failure (L{RemoteException}, L{MasterUnavailable} or
        an exception from the callback); the others are logged.
        """
        with self._idle:
            if not self._idle.wait_for(lambda: not self._outstanding, timeout):
                raise TimeoutError(f"{self._outstanding} jobs still running after {timeout} s")
        if self._failures:
            first, rest = self._failures[0], self._failures[1:]
            self._failures = []
            if rest:
                log.warn("{n} more jobs failed besides {first}", n=len(rest), first=first)
            raise first

    def close(self) -> None:
        """Disconnect from the master and stop this thread."""
        self._progress.close()
        if self._executor is not None:
            self._executor._close()
            self._done.put(None)

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

    def _completed(self, jobid: Any, ok: bool, value: Any, output: JobOutput) -> None:
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
