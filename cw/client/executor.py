"""
L{ClusterExecutor}: a C{concurrent.futures.Executor} over a cw master.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from typing import Any

from cw import discovery
from cw.client.display import executor_html, executor_text
from cw.client.echo import Echo
from cw.client.mapping import bounded_map, check_chunksize, run_chunk
from cw.client.session import (
    NO_OUTPUT,
    RECONNECT_TIMEOUT,
    JobOutput,
    Session,
    decode_result,
    job_options,
    logging_level,
    pickle_arguments,
    pickle_call,
    pickle_function,
    result_output,
)
from cw.core.versions import short, table_conflicts
from cw.discovery import default_host
from cw.errors import (
    JobDetached,
    JobKilled,
    MasterUnavailable,
    SubmitError,
    VersionConflict,
)
from cw.wire import commands as P
from cw.wire.versions import package_versions


class _Started(list):
    """An inbox item: sequence numbers of jobs the master handed to workers."""


class _Wrote(tuple):
    """An inbox item: C{(host, outputs)} of a L{P.OutputNotice}."""


class _Adopt(list):
    """An inbox item: numbers of this session's jobs the master holds (L{P.SessionJobs})."""


#: An inbox item: close the connection if no job is outstanding any more.
_CLOSE_IF_IDLE = object()


#: Executors that may have jobs outstanding, for the wait at interpreter exit.
_executors: weakref.WeakSet = weakref.WeakSet()


_interpreter_exiting = False


def _at_interpreter_exit() -> None:
    """
    Run by C{threading} before it joins non-daemon threads, as the standard
    executors' exit hook is: wait for every executor's outstanding futures
    (see L{ClusterExecutor.shutdown}); from now on, C{submit} raises.
    """
    global _interpreter_exiting
    _interpreter_exiting = True
    for executor in list(_executors):
        executor._interpreter_exit()


try:
    threading._register_atexit(_at_interpreter_exit)
except RuntimeError:  # imported while the interpreter shuts down
    _interpreter_exiting = True


def _refuse_after_interpreter_exit() -> None:
    if _interpreter_exiting:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


def _mark_running(future: futures.Future) -> bool:
    """
    Move a pending future to running (it may be running already); False if
    it was cancelled (its waiters are told, once) or has finished.
    """
    # The executor's side of the Future protocol: the states are read under
    # the future's own (reentrant) lock, as the standard executors do.
    with future._condition:
        state = future._state
        if state == futures._base.RUNNING:
            return True
        if state in (futures._base.PENDING, futures._base.CANCELLED):
            return future.set_running_or_notify_cancel()
        return False


def _settle(future: futures.Future, ok: bool, value: Any) -> None:
    """Set a running future's outcome, unless it was killed meanwhile."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except futures.InvalidStateError:
        pass


#: Results up to this many bytes (pickled) may be delivered in the reactor
#: thread, without a switch to the delivery thread (L{_Jobs.deliver_now}).
DELIVER_NOW_BYTES = 16 * 1024

#: ... and batches of up to this many results: bigger ones come from bursts
#: of jobs, where the delivery thread unpickling them while the reactor
#: thread sends and receives keeps the throughput up.
DELIVER_NOW_RESULTS = 4

#: How many recently submitted functions L{RecentFunctions} remembers.
RECENT_FUNCTIONS = 256


class RecentFunctions:
    """
    Which functions C{submit} sends by reference: those whose pickle (the
    same bytes, so a closure whose captured values changed is another
    function) was submitted before, among the last L{RECENT_FUNCTIONS}.
    Such a function is defined once per connection and its jobs carry only
    their arguments, so that a queued job costs the master its arguments
    alone.  A function submitted once travels inside its job, as before:
    a program submitting a new closure with every job does not fill the
    master with definitions used once.
    """

    def __init__(self, size: int = RECENT_FUNCTIONS) -> None:
        self.size = size
        self._keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def seen(self, fn: Callable) -> tuple[bytes, bytes] | None:
        """C{(key, pickle)} of C{fn} if it was seen recently; note it and return None if not."""
        try:
            key, data = pickle_function(fn)
        except SubmitError:
            return None  # pickle_call names the job and what cannot be pickled
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return key, data
            self._keys[key] = None
            if len(self._keys) > self.size:
                self._keys.popitem(last=False)
        return None


class ClusterFuture(futures.Future):
    """
    A future of a cw job.

    It is running (C{running()} is true) from the moment the master hands
    its job to a worker, as a L{futures.ProcessPoolExecutor} future is from
    the moment its call enters the call queue; the job may still wait on
    the worker for a free job process.  From then on C{cancel()} returns
    False, as for any running future; L{ClusterExecutor.kill} kills it.
    Cancelling a pending future withdraws its job from the master's queue
    (should the master have handed it to a worker in the same instant, that
    job's process is killed).

    Once done, C{stdout} and C{stderr} hold what the job wrote to them
    (text; see L{JobOutput}); empty before, and for a job that never ran
    or whose worker was lost.
    """

    _output: JobOutput = NO_OUTPUT
    _withdraw: Callable[[], None] | None = None
    #: The job's sequence number on its executor's connection.
    _seq = 0
    #: The job's name in its errors.
    _jobid: Any = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        _mark_running(self)  # tells futures.wait() and as_completed()
        if self._withdraw is not None:
            self._withdraw()
        return True

    # An entry of its executor's table (see L{_Jobs}):

    @property
    def number(self) -> int:
        """The job's number in its executor's session (from 1, in the order submitted)."""
        return self._seq

    def _attach(self, executor: ClusterExecutor, seq: int) -> str:
        self._seq = seq
        self._jobid = f"#{seq}"
        self._withdraw = functools.partial(executor._withdraw, seq)
        return self._jobid

    def _start(self) -> None:
        _mark_running(self)

    @property
    def stdout(self) -> str:
        """What the job wrote to its standard output (the last megabyte), once done."""
        return self._output.stdout

    @property
    def stderr(self) -> str:
        """What the job wrote to its standard error (the last megabyte), once done."""
        return self._output.stderr

    def _finish(self, ok: bool, value: Any, output: JobOutput = NO_OUTPUT) -> None:
        if _mark_running(self):
            self._output = output
            _settle(self, ok, value)


class _Jobs:
    """
    The jobs an executor has outstanding, by sequence number, and the inbox
    of its delivery thread.  Every access to the table is under its lock,
    inside these methods.

    An entry is a L{ClusterFuture}, or anything else with its entry
    methods (a L{ClientThread}'s jobs, lighter than futures):
    C{_attach(executor, seq)} as it enters the table, returning the job's
    name for its errors; C{_jobid}, that name; C{_start()} when the master
    hands the job to a worker; C{_finish(ok, value, output)} with its
    outcome (a value, or an exception) and its L{JobOutput} (left out when
    the job did not end on a worker), in the delivery thread.
    """

    def __init__(self) -> None:
        #: Items for the delivery thread: put them with L{put}.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        #: Held by whoever delivers an item (the delivery thread, or the
        #: reactor thread delivering a result at once, see L{deliver_now}).
        self.delivering = threading.Lock()
        #: Items put and not delivered yet (under C{_count_lock}).
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._entries: dict[int, ClusterFuture] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        #: Threads in L{wait_idle} (under C{_lock}): the table emptying
        #: notifies C{_idle} only when someone waits (a lone job empties it
        #: with every result).
        self._idle_waiters = 0
        self._seq = itertools.count(1)

    def put(self, item: Any) -> None:
        """Hand C{item} to the delivery thread (it calls L{delivered} once it has)."""
        with self._count_lock:
            self._waiting += 1
        self.inbox.put(item)

    def delivered(self) -> None:
        """The delivery thread has delivered an item (call holding C{delivering})."""
        with self._count_lock:
            self._waiting -= 1

    @contextlib.contextmanager
    def _first_in_line(self) -> Iterator[bool]:
        """
        Whether this thread may deliver now, out of the delivery thread:
        nobody is delivering (C{delivering} is held until the block ends)
        and nothing waits to be delivered before.
        """
        if not self.delivering.acquire(blocking=False):
            yield False
            return
        try:
            with self._count_lock:
                first = not self._waiting
            yield first
        finally:
            self.delivering.release()

    def deliver_now(self, item: Any, deliver: Callable[[Any], None]) -> bool:
        """
        Deliver C{item} (no results: a notice that runs no user code) in this
        thread rather than through the delivery thread, if nothing waits to
        be delivered before it and nobody is delivering; return whether it
        was delivered.
        """
        with self._first_in_line() as first:
            if first:
                deliver(item)
            return first

    def deliver_results_now(self, results: list[P.Result], deliver: Callable[[list[P.Result]], None]) -> bool:
        """
        Deliver C{results} in this thread (the reactor's) rather than through
        the delivery thread, saving a lone job's result a thread switch, when
        that keeps every promise of the delivery thread: nothing is waiting
        to be delivered before them (order), nobody is delivering (one
        deliverer at a time), their payloads are small (unpickling them
        cannot hold up the reactor), they are few (a lone job's, not a
        burst's) and their futures have no done-callbacks
        (user code, which may block or submit, never runs in the reactor
        thread).  Return whether they were delivered.
        """
        if len(results) > DELIVER_NOW_RESULTS:
            return False
        size = 0
        for result in results:
            size += len(result.payload)
        if size > DELIVER_NOW_BYTES:
            return False
        # As L{_first_in_line}, spelt out: this runs for every lone job's
        # result, where a generator's context managers cost more than the rest.
        if not self.delivering.acquire(blocking=False):
            return False
        held = []
        try:
            with self._count_lock:
                if self._waiting:
                    return False
            with self._lock:
                entries = [self._entries.get(result.seq) for result in results]
            for entry in entries:
                if entry is None:
                    continue
                if type(entry) is not ClusterFuture:
                    return False
                # Held until delivered: a done-callback added meanwhile
                # runs in the thread that adds it, the future being done.
                condition = entry._condition
                condition.acquire()
                held.append(condition)
                if entry._done_callbacks:
                    return False
            deliver(results)
            return True
        finally:
            for condition in reversed(held):
                condition.release()
            self.delivering.release()

    def add(self, future: ClusterFuture) -> int:
        with self._lock:
            seq = next(self._seq)
            self._entries[seq] = future
        return seq

    def number_after(self, seqs: list[int]) -> None:
        """Number new jobs after C{seqs} (jobs of this session that an earlier client left)."""
        with self._lock:
            highest = max(seqs, default=0)
            nxt = next(self._seq)
            self._seq = itertools.count(max(nxt, highest + 1))

    def adopt(self, seq: int, future: ClusterFuture) -> bool:
        """Enter C{future} under C{seq} unless an entry has it; return whether it was entered."""
        with self._lock:
            if seq in self._entries:
                return False
            self._entries[seq] = future
            return True

    def forget(self, seq: int) -> None:
        with self._lock:
            self._entries.pop(seq, None)
            if not self._entries and self._idle_waiters:
                self._idle.notify_all()

    def pop(self, seq: int, future: ClusterFuture) -> ClusterFuture | None:
        """Forget C{seq} if it is C{future}; return it, or None if it was not there."""
        with self._lock:
            if self._entries.get(seq) is not future:
                return None
            del self._entries[seq]
            if not self._entries and self._idle_waiters:
                self._idle.notify_all()
            return future

    def get(self, seq: int) -> ClusterFuture | None:
        with self._lock:
            return self._entries.get(seq)

    def get_many(self, seqs: Iterable[int]) -> list[ClusterFuture | None]:
        with self._lock:
            return [self._entries.get(seq) for seq in seqs]

    def items(self) -> list[tuple[int, ClusterFuture]]:
        """The outstanding C{(seq, future)} pairs, in submission order."""
        with self._lock:
            return list(self._entries.items())

    def clear(self) -> list[ClusterFuture]:
        """Forget every outstanding future; return them."""
        with self._lock:
            futures = list(self._entries.values())
            self._entries.clear()
            self._idle.notify_all()
        return futures

    def outstanding(self) -> int:
        with self._lock:
            return len(self._entries)

    def wait_idle(self, timeout: float | None) -> bool:
        with self._lock:
            self._idle_waiters += 1
            try:
                return self._idle.wait_for(lambda: not self._entries, timeout)
            finally:
                self._idle_waiters -= 1


class ClusterExecutor(futures.Executor):
    """
    A L{concurrent.futures.Executor} whose jobs run on a cw cluster.

    Connects at construction (raising L{MasterUnavailable} if no master
    answers).  A future of a job that raised raises the job's exception as
    an instance of both its class and L{RemoteException} (see
    L{cw.errors.remote_error}); one whose job process died, L{JobCrashed}
    (or L{JobTimeout}, L{WorkerLost}); if the master connection is lost,
    every outstanding future raises L{MasterUnavailable}.  Futures follow
    the L{concurrent.futures} contract: see L{ClusterFuture} for when one is
    running, L{kill} to stop running jobs, and L{shutdown}.
    C{timeout} and C{max_attempts} are defaults for every job; see
    L{submit_with}.  C{weight}: when several clients have jobs queued, this
    one gets that many jobs per turn (default 1).  C{master_timeout}: seconds
    without a sign of life from the master before every pending future
    raises L{MasterUnavailable} (default C{CW_MASTER_TIMEOUT}, else
    L{MASTER_TIMEOUT}; 0: no limit).  C{session}: this executor's session
    name, which the master knows its jobs by across reconnections (default:
    a new random one, L{session_name}).  C{version_mismatch}: jobs sent to a
    worker whose Python (major.minor, implementation) or cloudpickle
    (major) version differs from this client's fail with
    L{IncompatibleWorker} naming both ("error", the default), or are never
    sent to such workers ("avoid"); either way a warning is logged at
    connect if there are such workers (see L{versions}).

    Each future's C{stdout} and C{stderr} hold what its job wrote.
    C{echo=True} also writes that to this process's standard output and
    error while the jobs run, each line prefixed with the job and its host
    (C{[#12 node7] ...}); C{forward_logging=LEVEL} (C{logging.INFO} or
    C{"INFO"}) hands the jobs' C{logging} records at or above C{LEVEL} to
    this process's C{logging}, under C{cw.job.<their logger's name>}, as
    they come.  Both are defaults for every job (see L{submit_with}).

    C{reconnect_timeout}: when the connection to the master is lost (it
    stopped, crashed or restarted, or the network failed), keep trying to
    reach it again for this many seconds (default L{RECONNECT_TIMEOUT}; 0:
    fail at once), finding it again first if it was found through an
    address file or SLURM, and resubmit every job whose result has not
    arrived.  Futures stay pending meanwhile and L{status} says
    C{"reconnecting"}; only after that time do they raise
    L{MasterUnavailable}.  A job may so run more than once, but its future
    gets one result.
    """

    #: Ask the master for L{P.JobsStarted} notices, so that futures become
    #: running when their jobs reach a worker (L{ClientThread} does not
    #: need them and saves the messages).
    _running_notices = True
    #: Wait for the outstanding futures at interpreter exit (as the
    #: standard executors do; a L{ClientThread} does not).
    _wait_at_exit = True

    def __init__(
        self,
        host: str | None = None,
        port: int = P.PORT,
        connect_timeout: float | None = None,
        secret_file: str | None = None,
        insecure: bool | None = None,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        weight: int = 1,
        master_timeout: float | None = None,
        session: str | None = None,
        version_mismatch: str = "error",
        echo: bool = False,
        forward_logging: int | str | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        #: Defaults for every job of this executor (see L{submit_with}).
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.echo = echo
        self.forward_logging = forward_logging
        logging_level(forward_logging)  # a bad level fails here, not at the first submit
        #: Shows the output of jobs with C{echo} or C{forward_logging}.
        self._echo = Echo()
        self._jobs = _Jobs()
        self._recent = RecentFunctions()
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        #: shutdown(wait=False) was called: close the connection once idle.
        self._close_when_idle = False
        #: shutdown(wait=False, cancel_futures=True): do not wait at exit.
        self._abandoned = False
        #: Futures of jobs that earlier clients of this session left with
        #: the master (L{results_of_session}), by job number.
        self._adopted: dict[int, ClusterFuture] = {}
        self._adopted_ready = threading.Event()
        self.session = Session(
            default_host(host),
            port,
            self._results_arrived,
            self._jobs.put,
            connect_timeout,
            secret_file=secret_file,
            insecure=insecure,
            weight=weight,
            master_timeout=master_timeout,
            session=session,
            version_mismatch=version_mismatch,
            reconnect_timeout=reconnect_timeout,
            find=self._master_source(host),
            on_started=self._started if self._running_notices else None,
            on_session_jobs=self._session_jobs,
        )
        self.session.on_output = lambda host, outputs: self._jobs.put(_Wrote((host, outputs)))
        self._thread = threading.Thread(target=self._deliver, name="cw-executor", daemon=True)
        self._thread.start()
        if self._wait_at_exit:
            _executors.add(self)

    def _master_source(self, host: str | None) -> discovery.MasterSource | None:
        """How to find the master again on reconnecting (see L{discovery.master_source})."""
        return discovery.master_source(host)

    @property
    def session_name(self) -> str:
        """This executor's session name (the C{session} it was given, or a generated one)."""
        return self.session.name

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> futures.Future:
        return self.submit_with(fn, args, kwargs)

    def submit_with(
        self,
        fn: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        **options: Any,
    ) -> futures.Future:
        """
        Submit C{fn(*args, **kwargs)} with options for this job alone
        (L{submit} cannot take them: its keyword arguments belong to C{fn}).
        C{echo} and C{forward_logging} override the executor's (see
        L{ClusterExecutor}; C{forward_logging=False}: not for this job).
        The options, by keyword, are those of L{job_options} (which
        L{ClientThread.submit_with} takes too); any other raises
        C{TypeError}.

        @param timeout: seconds the job may run; then its process is killed
            and the future raises L{JobTimeout}.  Default: the executor's
            C{timeout}, else the worker's C{--job-timeout}, else no limit.
        @param max_attempts: how many lost workers the job may outlive
            before it fails with L{WorkerLost}.  Default: the executor's
            C{max_attempts}, else the master's C{--max-attempts}.
        @param priority: among this client's queued jobs, higher runs first
            (default 0); it does not jump ahead of other clients' turns.
        @param expected_duration: seconds the job is expected to run: a
            worker whose walltime ends sooner does not start it (adaptive
            SLURM pools).  Jobs of a C{map} get the measured mean instead.
        @param resources: what the job needs of its worker, e.g.
            C{{"cpus": 4, "memory": "16G", "gpus": 1}} or custom names
            (C{{"licenses": 1}}); it runs only where that much is free, and
            gets that many cores and exactly its GPUs (see "Resources" in
            the README).  Default: one cpu, no memory, no GPU.
        @param tags: names the worker must have (its C{--tag}s), e.g.
            C{{"avx512"}}.
        @param env: environment variables the job runs with, e.g.
            C{{"OMP_NUM_THREADS": "1"}} (names and values strings); set in
            its job process for this job alone and restored afterwards,
            they override what its C{resources} set.
        """
        options = job_options(self, **options)
        return self._submit(fn, tuple(args), dict(kwargs or {}), options)

    def _submit(
        self,
        fn: Callable,
        args: tuple,
        kwargs: dict,
        options: bytes,
        cached: tuple[bytes, bytes] | None = None,
    ) -> futures.Future:
        """
        Submit one job; with C{cached} (see L{pickle_function}), C{fn} is
        sent once per connection and cached on workers, and each job
        carries only its arguments.
        """

        def job(seq: int) -> P.Job:
            payload, func = self._pickle(f"#{seq}", fn, args, kwargs, cached)
            return P.Job(0, seq, payload, options, func)

        return self._send(job, ClusterFuture())

    def _pickle(
        self, jobid: Any, fn: Callable, args: tuple, kwargs: dict, cached: tuple[bytes, bytes] | None = None
    ) -> tuple[bytes, bytes]:
        """
        A job's C{(payload, function key)}: with C{cached}, or when
        C{fn}'s pickle was submitted recently (L{RecentFunctions}), the
        function is defined on this connection (once) and the payload holds
        only the arguments; otherwise the payload holds the whole call and
        the key is empty.
        """
        if cached is None:
            cached = self._recent.seen(fn)
        if cached is None:
            return pickle_call(jobid, fn, args, kwargs), b""
        self.session.define(*cached)
        return pickle_arguments(jobid, fn, args, kwargs), cached[0]

    def _send(self, job: Callable[[int], P.Job], entry: Any) -> Any:
        """Enter C{entry} (see L{_Jobs}) in the table and send C{job(seq)}; return C{entry}."""
        _refuse_after_interpreter_exit()
        # Outside the lock, so that a blocked submit never blocks shutdown.
        self.session.wait_for_room(lambda: self._shutdown)
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            seq = self._jobs.add(entry)
            jobid = entry._attach(self, seq)
            try:
                # A lone job may be written by this thread (see Session.send).
                self.session.send(job(seq), jobid, now=True)
            except BaseException:
                self._jobs.forget(seq)
                raise
        return entry

    def _mapper(
        self,
        fn: Callable,
        resources: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Callable[..., futures.Future]:
        """
        A submit function for L{map}: C{fn} is pickled once and cached on
        the workers; every job asks for C{resources}, C{tags} and C{env}.
        """
        options = job_options(self, None, None, resources=resources, tags=tags, env=env)
        cached = pickle_function(fn)
        return lambda fn, *args: self._submit(fn, args, {}, options, cached)

    def _session_jobs(self, seqs: list[int]) -> None:
        """
        Registered (reactor thread, before any result): number new jobs
        after the session's, and give futures to those this executor did
        not submit (in the delivery thread, in order with the results).
        """
        self._jobs.number_after(seqs)
        self._jobs.put(_Adopt(seqs))

    def _adopt(self, seqs: list[int]) -> None:
        for seq in seqs:
            future = ClusterFuture()
            if self._jobs.adopt(seq, future):
                future._attach(self, seq)
                self._adopted[seq] = future
        self._adopted_ready.set()

    def results_of_session(self, timeout: float | None = 60) -> dict[int, futures.Future]:
        """
        The jobs that earlier clients of this executor's session left with
        the master (C{ClusterExecutor(..., session="NAME")} in another
        process, gone since; see L{detach}), as futures by job number: the
        numbers they had in that client (L{ClusterFuture.number}), from 1 in
        the order submitted.  Those whose results waited at the master are
        done already; the others complete as their jobs finish, and are
        outstanding jobs of this executor (C{shutdown} waits for them,
        C{kill} stops them).  Empty unless the master runs with C{--state}:
        without it, nothing outlives a client.

        @param timeout: seconds to wait for the master's list (it comes with
            the registration, so this rarely waits).
        """
        if not self._adopted_ready.wait(timeout):
            raise TimeoutError(f"the cw master at {self.session.address} did not list the session's jobs")
        return dict(self._adopted)

    def detach(self, timeout: float = 60) -> list[futures.Future]:
        """
        Leave this executor's outstanding jobs with the master and close
        the connection, once the master has them on disk: they run
        whatever becomes of this process, and a later
        C{ClusterExecutor(..., session=ex.session_name)} collects their
        results with L{results_of_session}.  Submitting is refused from
        now on; the outstanding futures raise L{JobDetached}.  Return them.

        Needs a master with a state file (C{--state}); raises
        L{SubmitError} otherwise, L{TimeoutError} if the master has not
        stored every job within C{timeout} seconds.
        """
        if not self.session.durable:
            raise SubmitError(
                f"the cw master at {self.session.address} keeps no state file (--state): jobs"
                " left with it would be dropped when this client leaves; wait for them instead"
            )
        with self._shutdown_lock:
            self._shutdown = True
        if not self.session.wait_stored(timeout):
            raise TimeoutError(
                f"the cw master at {self.session.address} did not store this client's jobs within {timeout} s"
            )
        left = self._jobs.clear()
        self._close()
        error = JobDetached(
            f"the job was left with the cw master under session {self.session_name!r}; collect its"
            f" result with ClusterExecutor(..., session={self.session_name!r}).results_of_session()"
        )
        for entry in left:
            entry._finish(False, error)
        return left

    def _withdraw(self, seq: int) -> None:
        """A future was cancelled: forget it and withdraw its job from the cluster."""
        self._jobs.forget(seq)
        self.session.cancel(seq)
        self._check_idle()

    def kill(self, *fs: futures.Future) -> int:
        """
        Stop these futures' jobs wherever they are: a future not yet running
        is cancelled (its job withdrawn from the queue); a running job's
        process is killed and its future raises L{JobKilled} (a
        L{futures.CancelledError}).  Finished futures and futures of other
        executors are left alone.  Return how many jobs were stopped.

        This is the one way to stop a running job: C{cancel()} returns False
        for a running future, as the standard library's does.
        """
        stopped = 0
        for future in fs:
            seq = getattr(future, "_seq", 0)
            if self._jobs.get(seq) is not future:  # not this executor's, or done
                continue
            if future.cancel():
                stopped += 1
                continue
            if future.done() or self._jobs.pop(seq, future) is None:
                continue
            self.session.cancel(seq)
            try:
                future.set_exception(
                    JobKilled(f"job #{seq} was killed while running, by ClusterExecutor.kill()")
                )
                stopped += 1
            except futures.InvalidStateError:  # its result came first
                pass
            self._check_idle()
        return stopped

    def _check_idle(self) -> None:
        """After shutdown(wait=False): close the connection once no job is outstanding."""
        if self._close_when_idle and not self._jobs.outstanding():
            self._jobs.put(_CLOSE_IF_IDLE)

    def _results_arrived(self, results: list[P.Result]) -> None:
        """Results from the master (reactor thread): deliver them at once if that is safe, else queue them."""
        if self._jobs.deliver_results_now(results, self._deliver_results):
            self._check_idle()
        else:
            self._jobs.put(results)

    def _started(self, seqs: list[int]) -> None:
        """Jobs handed to workers (reactor thread): mark their futures running, at once if that is safe."""
        item = _Started(seqs)
        if not self._jobs.deliver_now(item, self._mark_started):
            self._jobs.put(item)

    def _deliver(self) -> None:
        """The delivery thread: running notices, results and failures, in arrival order."""
        inbox = self._jobs.inbox
        while True:
            item = inbox.get()
            with self._jobs.delivering:
                try:
                    stop = self._deliver_item(item)
                finally:
                    self._jobs.delivered()
            item = None  # a big result's payload is not kept until the next item
            if stop:
                return

    def _deliver_item(self, item: Any) -> bool:
        """Deliver one inbox item; True when the delivery thread ends."""
        if item is None:
            return True
        if item is _CLOSE_IF_IDLE:
            if not self._jobs.outstanding():
                self.session.close()
                return True
        elif isinstance(item, _Started):
            self._mark_started(item)
        elif isinstance(item, _Wrote):
            self._show_output(*item)
        elif isinstance(item, _Adopt):
            self._adopt(item)
        elif isinstance(item, Exception):
            self._fail_all(item)
        else:
            self._deliver_results(item)
        if self._close_when_idle and not self._jobs.outstanding():
            self.session.close()
            return True
        return False

    def _mark_started(self, seqs: list[int]) -> None:
        for entry in self._jobs.get_many(seqs):
            if entry is not None:
                entry._start()

    def _show_output(self, host: str, outputs: list[P.Output]) -> None:
        """Show what running jobs wrote (L{Echo})."""
        for output in outputs:
            entry = self._jobs.get(output.seq)
            if entry is not None:
                self._echo.show(self._echo_label(entry), host, output)

    def _echo_label(self, entry: Any) -> str:
        """How lines of C{entry}'s job are prefixed: C{#12}."""
        return entry._jobid

    def _deliver_results(self, results: list[P.Result]) -> None:
        # Functions of their own, so that no future or result stays
        # referenced by the delivery thread once it is done with them.
        echo = self._echo
        for result in results:
            echo.finish(result.seq)
            entry = self._jobs.get(result.seq)
            if entry is None:
                continue
            ok, value = decode_result(entry._jobid, result)
            entry._finish(ok, value, result_output(result))
            self._jobs.forget(result.seq)

    def _fail_all(self, error: Exception) -> None:
        """
        The connection is lost: every outstanding job fails with C{error}
        (a L{MasterUnavailable} as one of its own, that names the job).
        """
        for entry in self._jobs.clear():
            if type(error) is MasterUnavailable:
                entry._finish(False, MasterUnavailable(f"job {entry._jobid}: {error}"))
            else:
                entry._finish(False, error)

    def outstanding(self) -> list[futures.Future]:
        """
        This executor's futures that are not done yet (queued or running),
        in the order submitted: C{ex.kill(*ex.outstanding())} stops them all.
        """
        # A future is finished (its waiters woken) just before it leaves the
        # table (see _deliver_results): a done one may still be there.
        return [future for _, future in self._jobs.items() if not future.done()]

    def status(self) -> dict:
        """
        The master's status snapshot (workers, queue, counts), with this
        client's C{connection} (C{"connected"}), C{session} and C{master}.
        While the client is reconnecting (see C{reconnect_timeout}) the
        master cannot be asked: then only the client's side, with
        C{connection} C{"reconnecting"} (C{"lost"} once it gave up), the
        C{reason}, C{reconnecting_for} and C{gives_up_in} seconds, and
        C{outstanding} jobs.
        """
        if self.session.state == "connected":
            try:
                status = self.session.call(P.GetStatus)["status"]
            except MasterUnavailable:
                pass  # lost just now: say how things stand
            else:
                return {**status, **self.session.connection_status()}
        return {**self.session.connection_status(), "outstanding": self._jobs.outstanding()}

    def _state(self) -> str:
        if self._shutdown:
            return "shut down"
        if self.session.state == "reconnecting":
            return "reconnecting"
        return "connected" if self.session.proto is not None else "disconnected"

    def __repr__(self) -> str:
        """Where it is connected and how many jobs it has outstanding; asks the master nothing."""
        return executor_text(
            type(self).__name__, self.session.address, self._state(), self._jobs.outstanding()
        )

    def _repr_html_(self) -> str:
        """
        Jupyter's display: also the master's workers, slots, queue and
        dashboard link, from its status (a master that does not answer
        within 5 s is shown as such).
        """
        status = error = None
        if self.session.proto is not None:
            try:
                status = self.session.call(P.GetStatus, timeout=5)["status"]
            except Exception as e:
                error = f"no status: {type(e).__name__}: {e}"
        return executor_html(
            type(self).__name__, self.session.address, self._state(), self._jobs.outstanding(), status, error
        )

    def versions(
        self, packages: Iterable[str] = (), check: bool = False, timeout: float = 30
    ) -> dict[str, Any]:
        """
        The versions of Python, its implementation, cw, cloudpickle and
        Twisted of this client and of each worker, as Dask's
        C{get_versions}: C{{"client": {...}, "workers": {"host:pid": {...}}}}.

        @param packages: distribution names (C{["numpy"]}) whose installed
            versions are added under C{"packages"} of each entry (None: not
            installed); a worker looks them up as its jobs would import
            them, with this client's C{sys.path} in front, without
            importing them.
        @param check: raise L{VersionConflict} listing every worker whose
            Python or cloudpickle version is incompatible with this
            client's (L{cw.core.versions}), or whose C{packages} differ.
        @param timeout: seconds to wait for the workers' answers; a worker
            that does not answer is listed with an C{"error"}.
        """
        packages = list(packages)
        client = dict(self.session.versions)
        if packages:
            client["packages"] = package_versions(packages)
        answers = self.session.probe_workers(packages, timeout=timeout)
        workers = {}
        for entry in answers:
            report = entry.get("report")
            if report is None:
                workers[entry["peer"]] = {"error": entry.get("error", "no answer")}
                continue
            workers[entry["peer"]] = {**(report.get("versions") or {})}
            if packages:
                workers[entry["peer"]]["packages"] = report.get("packages", {})
        table = {"client": client, "workers": workers}
        if check:
            conflicts = table_conflicts(table)
            if conflicts:
                raise VersionConflict(
                    f"{len(conflicts)} worker(s) of the master at {self.session.address} differ from this"
                    f" client ({short(client)}): " + "; ".join(conflicts)
                )
        return table

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        timeout: float | None = None,
        chunksize: int | str = 1,
        buffersize: int | None = None,
        progress: bool | dict = False,
        resources: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        """
        Like L{concurrent.futures.Executor.map}: results in input order.

        @param chunksize: calls per job, as in
            L{concurrent.futures.ProcessPoolExecutor.map}: C{chunksize}
            calls travel, run and return as one job (results are still
            yielded one by one; a call that raised fails at its own item,
            after the items of its chunk before it, and the calls after it
            in its chunk are not made).  C{"auto"}: one call runs first,
            then the chunks are sized from the measured duration of the
            calls so that one takes about 20 ms.  For many short calls.
        @param buffersize: keep at most this many jobs (chunks) in flight,
            submitting the next as each result is taken (as Python 3.14
            added), so that an iterable of any length, even an endless
            generator, runs in bounded memory.  Default: submit everything
            at once.
        @param progress: show a tqdm bar (done, failed, rate, time left);
            a dict is passed on to tqdm as options.
        @param resources: what each job needs of its worker (see L{submit_with}).
        @param tags: names each job's worker must have (see L{submit_with}).
        @param env: environment variables each job runs with (see L{submit_with}).

        C{fn} is pickled once and sent to each worker once (each job carries
        only its arguments), so a function that closes over large data costs
        that data once per worker, not once per job.
        """
        return self._map(fn, iterables, timeout, chunksize, buffersize, True, progress, resources, tags, env)

    def map_unordered(
        self,
        fn: Callable,
        *iterables: Iterable,
        timeout: float | None = None,
        chunksize: int | str = 1,
        buffersize: int | None = None,
        progress: bool | dict = False,
        resources: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        """Like L{map}, but yield each result as soon as its job (chunk) finishes."""
        return self._map(fn, iterables, timeout, chunksize, buffersize, False, progress, resources, tags, env)

    def _map(
        self,
        fn: Callable,
        iterables: tuple[Iterable, ...],
        timeout: float | None,
        chunksize: int | str,
        buffersize: int | None,
        ordered: bool,
        progress: bool | dict,
        resources: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        check_chunksize(chunksize)
        submit_chunk = None
        if chunksize != 1:
            chunk_fn = functools.partial(run_chunk, fn)
            submit = self._mapper(chunk_fn, resources, tags, env)
            submit_chunk = functools.partial(submit, chunk_fn)
        return bounded_map(
            None if chunksize != 1 else self._mapper(fn, resources, tags, env),
            fn,
            iterables,
            timeout=timeout,
            buffersize=buffersize,
            ordered=ordered,
            progress=progress,
            stop=self.kill,
            chunksize=chunksize,
            submit_chunk=submit_chunk,
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """
        Refuse new jobs (C{submit} raises L{RuntimeError}) and let the
        outstanding ones finish, as L{concurrent.futures.Executor.shutdown}.

        @param wait: wait for every outstanding future, then close the
            connection.  With C{wait=False}, return at once: the jobs keep
            running, their futures complete later, and the connection
            closes when the last one is done (at interpreter exit, the
            program waits for them, as with the standard executors).
        @param cancel_futures: cancel the futures that are not running
            (their jobs leave the master's queue); running ones finish
            (L{kill} stops those).  With C{wait=False} too, nothing is
            waited for at interpreter exit, and the running ones fail at
            once if the master connection is lost (no reconnecting).
        """
        with self._shutdown_lock:
            self._shutdown = True
            if cancel_futures and not wait:
                self._abandoned = True
        if self._abandoned:
            # Its remaining jobs are not worth resubmitting to another master.
            self.session.stop_reconnecting()
        if cancel_futures:
            self._cancel_pending()
        if not wait:
            self._close_when_idle = True
            self._check_idle()
            return
        self._jobs.wait_idle(None)
        self._close()

    def _close(self) -> None:
        """Close the connection (outstanding jobs are dropped) and end the delivery thread."""
        self.session.close()
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _cancel_pending(self) -> None:
        """Cancel every future that is not running; withdraw their jobs in one go."""
        cancelled = []
        for seq, future in self._jobs.items():
            if futures.Future.cancel(future):
                _mark_running(future)
                cancelled.append(seq)
        for seq in cancelled:
            self._jobs.forget(seq)
        # With nothing left running, the connection closes next, and the
        # master drops all of this client's jobs then.
        if self._jobs.outstanding():
            for seq in cancelled:
                self.session.cancel(seq)

    def _interpreter_exit(self) -> None:
        """
        At interpreter exit: wait for the outstanding futures (unless
        L{shutdown} was told C{wait=False, cancel_futures=True}), as the
        standard executors do, then close the connection.

        A program that ends with jobs outstanding is not kept waiting for a
        master that may never come back: from here on a lost connection is
        not ridden out (C{reconnect_timeout} no longer applies), and one
        being ridden out now fails the outstanding jobs with
        L{MasterUnavailable} at the next reconnect attempt.
        """
        self.session.stop_reconnecting()
        if not self._abandoned and self.session.reactor.running:
            self._jobs.wait_idle(None)
        if self.session.reactor.running:
            self.session.close()


class SlurmExecutor(ClusterExecutor):
    """
    A L{ClusterExecutor} connected to this user's SLURM master
    (L{cw.slurm.master_host}: waits, bounded, for a master job that is
    queued or starting), as in the original; C{cluster} names one of
    several clusters; other options are L{ClusterExecutor}'s.
    """

    def __init__(self, cluster: str | None = None, **options: Any) -> None:
        self._cluster = cluster
        super().__init__(discovery.master_host(cluster), **options)

    def _master_source(self, host: str | None) -> discovery.MasterSource | None:
        return discovery.slurm_source(self._cluster)
