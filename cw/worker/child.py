"""
The job process: an ampoule child that runs jobs one at a time, in the
batches its worker sends (L{P.RunBatch}).

Each job runs in its client's working directory with the client's
C{sys.path} entries in front of the child's own.  The payload is opened
here, and only here: the worker and master never unpickle user data.
Whatever a job leaves running is killed when it returns
(L{cw.worker.containment}).

A job that asked for resources (L{cw.core.resources}) runs with exactly
what it was given (L{job_limits}): C{CUDA_VISIBLE_DEVICES} and
C{ROCR_VISIBLE_DEVICES} its GPUs, an affinity of its cores, its cpus as
C{OMP_NUM_THREADS}, C{MKL_NUM_THREADS} and C{OPENBLAS_NUM_THREADS}, and an
address-space limit of its memory beyond what the process used before.
A job's own C{env} option (C{submit_with(..., env=)}) is set after that,
overriding it.  All of it is restored once the job returns.

Functions that jobs share (C{ClusterExecutor.map}) arrive once and are kept
in a small cache, least recently used first out, unpickled once in the
context of the first job that uses them.  The worker's
L{cw.worker.pool.ChildLink} keeps the same cache of keys with the same rule, so it
knows which functions this process holds without asking.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import socket
import sys
import traceback
from collections import OrderedDict
from collections.abc import Iterator

import cloudpickle
from ampoule.child import AMPChild

from cw.core.config import OUTPUT_LIMIT
from cw.core.payload import REFERENCE_SIZE, Segments, read_reference
from cw.core.resources import allocation_of, format_size, shape_of
from cw.core.validation import ENV
from cw.errors import ReportKind, SharedMemoryRefused, exception_fields
from cw.wire import commands as P
from cw.wire import pickling
from cw.wire.checked import LeanAnswers
from cw.wire.private import push
from cw.wire.streaming import ChunkReceiver, StreamingSender
from cw.worker.capture import OutputCapture, Watcher
from cw.worker.containment import kill_leftovers
from cw.worker.pipes import bulk_pipe_reads
from cw.worker.shared import THRESHOLD, aligned, map_private, peer_path, release, write_parts

_inserted: list[str] = []

#: Unpickled functions a job process keeps (see L{FunctionCache}).
FUNCTION_CACHE = 32

#: Counters a job can read to see what its process did (used by tests).
stats = {"functions_unpickled": 0, "jobs": 0, "shared_in": 0, "shared_out": 0, "referenced_in": 0}


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


class FunctionCache:
    """
    Up to C{size} functions by C{(client, key)}, least recently used
    evicted first.  L{use} is called once per job that names a function, in
    job order, here and in the worker's L{cw.worker.pool.ChildLink}: the same
    sequence of calls leaves both with the same keys.
    """

    def __init__(self, size: int = FUNCTION_CACHE) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[int, bytes], object] = OrderedDict()

    def use(self, key: tuple[int, bytes], load) -> tuple[bool, object]:
        """
        The entry for C{key}, moved to the most recently used end; if
        absent, C{load()} makes it (and the oldest entry beyond C{size} is
        dropped).  Return C{(was_present, entry)}.
        """
        entries = self.entries
        if key in entries:
            entries.move_to_end(key)
            return True, entries[key]
        value = entries[key] = load()
        while len(entries) > self.size:
            entries.popitem(last=False)
        return False, value


def _failure(kind: str, message: str, **where) -> tuple[int, bytes]:
    return P.Outcome.RAISED, P.error_report(kind, message, traceback.format_exc(), **where)


def _where() -> dict:
    """Where a job ran, for its error report (asked of the system only when a job fails)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def run_payload(
    cwd: str, path: list[str], payload: bytes, function: object = None, keep: list | None = None
) -> tuple[int, bytes | Segments]:
    """
    Run a job and return an L{P.Outcome} code with its payload: the
    cloudpickled value, or a JSON error report carrying the remote
    traceback.  The payload is a cloudpickled C{(func, args, kwargs)}, or,
    when C{function} is given, C{(args, kwargs)} for that function (an
    exception instead of a function: it could not be unpickled).  Both
    ways, big buffers travel out of band, not copied (L{cw.wire.pickling}):
    the value's may be a L{Segments} of views of the value's buffers.
    The job's arguments are appended to C{keep} if given (to be freed
    later, see L{JobChild.last_arguments}).
    """
    stats["jobs"] += 1
    try:
        enter_context(cwd, path)
    except OSError as e:
        return P.Outcome.FAILED, P.error_report(
            type(e).__name__,
            f"cannot enter the client's working directory {cwd!r} on"
            f" {socket.gethostname()}: {e}; run workers on a machine that shares"
            " the client's filesystem",
            **_where(),
        )
    if isinstance(function, BaseException):
        return P.Outcome.RAISED, P.error_report(
            type(function).__name__,
            f"the job's function could not be unpickled on {socket.gethostname()}: {function}",
            getattr(function, "cw_traceback", ""),
            **_where(),
        )
    try:
        if function is None:
            func, args, kwargs = pickling.loads(payload)
        else:
            func = function
            args, kwargs = pickling.loads(payload)
        if keep is not None:
            keep.append((args, kwargs))
    except BaseException as e:
        return P.Outcome.RAISED, P.error_report(
            type(e).__name__,
            f"the job could not be unpickled on {socket.gethostname()}: {e}",
            traceback.format_exc(),
            **_where(),
        )
    try:
        value = func(*args, **kwargs)
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(e), e, tb))
        fields = exception_fields(e)
        return P.Outcome.RAISED, P.error_report(type(e).__name__, str(e), text, **_where(), **fields)
    try:
        return P.Outcome.OK, pickling.dumps(pickling.out_of_band(value))
    except BaseException as e:
        return P.Outcome.RAISED, P.error_report(
            type(e).__name__,
            f"the job's return value ({type(value).__name__}) could not be pickled: {e}",
            traceback.format_exc(),
            **_where(),
        )


def load_function(data: bytes) -> object:
    """Unpickle a cached function; an exception is returned, not raised."""
    stats["functions_unpickled"] += 1
    try:
        return cloudpickle.loads(data)
    except BaseException as e:
        e.cw_traceback = traceback.format_exc()
        return e


class CachedFunction:
    """
    A function as L{FunctionCache} keeps it in a job process: its pickle,
    unpickled on first use, in the context of the job that uses it (a
    function may come from a module only on the client's C{sys.path}).  A
    failed unpickling is not kept: the next job tries again.
    """

    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.function: object = None

    def get(self) -> object:
        """The function, or the exception that stopped it being unpickled."""
        if self.function is not None:
            return self.function
        if self.data is None:
            return _missing()
        loaded = load_function(self.data)
        if not isinstance(loaded, BaseException):
            self.function = loaded
        return loaded


class JobChild(StreamingSender, ChunkReceiver, LeanAnswers, AMPChild):
    """
    The ampoule child class that workers start; answers L{P.RunBatch}.

    @param memory_limit: the process's address-space limit in bytes
        (C{RLIMIT_AS}; a decimal string, as ampoule passes it), "0" for none.
    @param output_limit: bytes of each job's stdout, and of its stderr,
        that go back with its result (the last ones; a decimal string).
    """

    def __init__(self, memory_limit: str = "0", output_limit: str = str(OUTPUT_LIMIT)) -> None:
        super().__init__()
        bulk_pipe_reads()
        limit = int(memory_limit)
        if limit > 0:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        self.contexts: dict[int, dict] = {}
        self.functions = FunctionCache()
        self.output_limit = int(output_limit)
        #: Catches what jobs write to fd 1 and 2 (L{cw.worker.capture}):
        #: set once connected to the worker (not in a test that makes a
        #: JobChild in its own process).
        self.output: OutputCapture | None = None
        #: C{(worker pid, fd)} of the memory file to put big results in
        #: (L{cw.worker.shared}), until it is used; None: none given.
        self.reply: tuple[int, int] | None = None
        #: What the last batch leaves, let go once its answer is sent
        #: (L{sendBox}): the mappings of its payloads, released, its last
        #: job's arguments and its big results, dropped.  Unmapping or
        #: freeing a big one takes milliseconds (about 0.1 ms per MB),
        #: which the answer need not wait for.  (The arguments of a batch's
        #: other jobs go as the next job starts, as before: held no longer.)
        self.after_answer: list = []
        self.last_arguments: list = []

    def connectionMade(self):
        super().connectionMade()
        self.output = OutputCapture(self.output_limit)

    def sendBox(self, box) -> None:
        """Send C{box} (an answer, a chunk) to the worker now, not on the reactor's next turn."""
        super().sendBox(box)
        push(self.transport)
        self.let_go()

    def let_go(self) -> None:
        """Release and drop what the last batch left (L{after_answer}, L{last_arguments})."""
        self.last_arguments = []
        if self.after_answer:
            leftovers, self.after_answer = self.after_answer, []
            for leftover in leftovers:
                if type(leftover) is memoryview:
                    release(leftover)
            del leftover, leftovers

    @P.RunBatch.responder
    def run_batch(self, jobs, contexts, functions, shared=None):
        mapping = self.receive_shared(jobs, shared) if shared else None
        mappings, unavailable = open_references(jobs)
        try:
            if unavailable:
                runnable = [job for i, job in enumerate(jobs) if i not in unavailable]
                answer = self.run_jobs(runnable, contexts, functions)
                ran = iter(answer["results"])
                answer["results"] = [
                    unavailable[i] if i in unavailable else next(ran) for i in range(len(jobs))
                ]
            else:
                answer = self.run_jobs(jobs, contexts, functions)
        finally:
            for job in jobs:
                job.payload = b""
            self.after_answer += [mapping, *mappings]
        if self.reply is not None:
            self.reply_shared(answer)
        return answer

    def receive_shared(self, jobs: list[P.Job], shared: dict) -> memoryview | None:
        """
        Take what C{shared} (see L{P.RunBatch}) says: the reply file to
        keep, and the payloads that lie in the worker's memory file, mapped
        here copy-on-write (L{map_private}), each job's payload a view of
        its part.  Return the mapping (None if no payload is shared).
        """
        pid = shared["pid"]
        if "reply" in shared:
            self.reply = (pid, shared["reply"])
        if "fd" not in shared:
            return None
        try:
            mapping = map_private(pid, shared["fd"], shared["size"])
        except OSError as e:
            self.reply = None
            raise SharedMemoryRefused(
                f"job process {os.getpid()} cannot map its worker's memory file"
                f" {peer_path(pid, shared['fd'])}: {e}"
            ) from None
        for index, offset, length in shared["jobs"]:
            jobs[index].payload = mapping[offset : offset + length]
        stats["shared_in"] += len(shared["jobs"])
        return mapping

    def reply_shared(self, answer: dict) -> None:
        """
        Move the big result payloads of C{answer} into the reply file and
        say where in C{answer["shared"]}; if the file cannot be opened,
        they stay in the answer (and no reply file is used any more).
        """
        results = answer["results"]
        big = [i for i, result in enumerate(results) if len(result.payload) >= THRESHOLD]
        if not big:
            return
        pid, fd = self.reply
        self.reply = None  # used once: the worker gives a new one
        where, offset = [], 0
        try:
            handle = os.open(peer_path(pid, fd), os.O_RDWR | os.O_CLOEXEC)
            try:
                for i in big:
                    offset = aligned(offset)
                    end = write_parts(handle, [results[i].payload], offset)
                    where.append([i, offset, end - offset])
                    offset = end
            finally:
                os.close(handle)
        except OSError as e:
            message = f"cw: results go through the pipe: cannot write the worker's memory file: {e}\n"
            if self.output is not None:
                self.output.to_worker_log(message.encode())
            return
        for i in big:
            self.after_answer.append(results[i].payload)
            results[i].payload = b""
        answer["shared"] = {"size": offset, "results": where}
        stats["shared_out"] += len(big)

    def run_jobs(self, jobs: list[P.Job], contexts: dict, functions: dict) -> dict:
        """Run C{jobs} one after another; the answer to L{P.RunBatch}."""
        for client, context in contexts.items():
            self.contexts[int(client)] = context
        output = self.output
        if output is not None:
            output.stray()
        results = []
        for job in jobs:
            context = self.contexts.get(job.client, {})
            cwd, path = context.get("cwd", ""), context.get("path", [])
            function = None
            if job.func:
                key = (job.client, job.func)
                _, cached = self.functions.use(key, functools.partial(CachedFunction, functions.get(key)))
                if cached.function is None:
                    # The function is unpickled now, in its client's context
                    # (run_payload enters it for the job in any case).
                    try:
                        enter_context(cwd, path)
                    except OSError:
                        pass  # run_payload reports it
                function = cached.get()
            self.last_arguments = []  # the previous job's go now, before its memory is measured
            watcher = watch(output, job) if job.options and output is not None else None
            if job.options:
                with job_limits(job) as memory:
                    status, payload = run_payload(cwd, path, job.payload, function, self.last_arguments)
            else:  # nothing to set or limit (most jobs): no context manager to enter
                memory = 0
                status, payload = run_payload(cwd, path, job.payload, function, self.last_arguments)
            if memory and status == P.Outcome.RAISED:
                payload = explain_memory_error(payload, memory)
            if watcher is not None:
                watcher.stop()
            leftovers = kill_leftovers()
            stdout, stderr = output.take() if output is not None else (b"", b"")
            results.append(P.Result(job.client, job.seq, status, payload, stdout, stderr))
            if leftovers:
                message = (
                    f"cw: killed {leftovers} process(es) that job {job.seq} of client {job.client}"
                    " left running"
                )
                if output is not None:
                    output.to_worker_log(message.encode() + b"\n")
                else:
                    print(message, file=sys.stderr, flush=True)
        return {"results": results}


def open_references(jobs: list[P.Job]) -> tuple[list[memoryview], dict[int, P.Result]]:
    """
    Map the payloads that C{jobs} left in their clients' memory
    (L{cw.core.payload.reference}) copy-on-write, each job's payload then
    a view of its client's file.  Return the mappings (to release after
    the jobs), and the failed results of jobs whose file could not be
    opened (their client has ended, or runs on another machine), by index.
    """
    mappings: list[memoryview] = []
    unavailable: dict[int, P.Result] = {}
    for i, job in enumerate(jobs):
        if len(job.payload) != REFERENCE_SIZE:
            continue
        found = read_reference(job.payload)
        if found is None:
            continue
        pid, fd, inode, length = found
        try:
            view = map_private(pid, fd, length, inode, whose="client")
        except OSError as e:
            message = (
                f"job {job.seq}'s argument ({length:,} bytes) lies in the memory of its client (pid"
                f" {pid}), which its job process {os.getpid()} on {socket.gethostname()} could not open"
                f" ({e}): the client has ended, or runs on another machine than the master was told;"
                " submit the job again"
            )
            report = P.error_report(ReportKind.ARGUMENT_UNAVAILABLE, message)
            unavailable[i] = P.Result(job.client, job.seq, P.Outcome.FAILED, report)
        else:
            mappings.append(view)
            job.payload = view
            stats["referenced_in"] += 1
    return mappings, unavailable


def streams_output(options: bytes) -> bool:
    """
    Whether a job's options (JSON) may ask for its output while it runs
    (C{echo}, C{log}; see L{watch}): a look for the names, not parsed.
    Only such a job makes its job process send output notices.
    """
    return b'"echo"' in options or b'"log"' in options


def watch(output: OutputCapture, job: P.Job) -> Watcher | None:
    """
    A L{Watcher} sending C{job}'s output while it runs, if its options ask
    for it: C{echo} (its stdout and stderr) or C{log} (its logging records
    at or above that level).
    """
    if not streams_output(job.options):
        return None  # other options only: not worth parsing here
    options = P.read_options(job)
    echo = options.get("echo") is True
    level = options.get("log")
    if not isinstance(level, int) or isinstance(level, bool):
        level = None
    if not echo and level is None:
        return None
    return output.watch(job.client, job.seq, echo, level)


#: Environment variables that tell numerical libraries how many threads to start.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: Environment variables that select GPUs (NVIDIA's and AMD's).
GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def _virtual_size() -> int:
    """This process's address-space size in bytes (0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


_ENV_KEY = json.dumps(ENV).encode()


def job_env(job: P.Job) -> dict[str, str]:
    """The environment variables C{job}'s options ask for (checked by L{cw.core.validation.check_env})."""
    if not job.options or _ENV_KEY not in job.options:
        return {}  # no env option: not worth parsing
    env = P.read_options(job).get(ENV)
    if not isinstance(env, dict):
        return {}
    return {name: value for name, value in env.items() if isinstance(value, str)}


@contextlib.contextmanager
def job_limits(job: P.Job) -> Iterator[int]:
    """
    Run the body with what a sized job was given and the environment
    variables a job asked for (see the module docstring); yields the bytes
    of memory it asked for (0: no limit).  Other jobs run as they are.
    """
    shape = shape_of(job) if job.options else None
    env = job_env(job)
    if shape is None and not env:
        yield 0
        return
    names = (THREAD_VARIABLES + GPU_VARIABLES if shape is not None else ()) + tuple(env)
    saved = {name: os.environ.get(name) for name in names}
    allocation = allocation_of(job) if shape is not None else {}
    if shape is not None:
        gpus = ",".join(str(gpu) for gpu in allocation.get("gpus", []))
        for name in GPU_VARIABLES:
            os.environ[name] = gpus
        for name in THREAD_VARIABLES:
            os.environ[name] = str(shape.cpus)
    os.environ.update(env)  # the job's own, over what its resources set
    affinity = None
    cores = allocation.get("cores") or []
    if cores and hasattr(os, "sched_setaffinity"):
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cores)
    limits = None
    memory = shape.memory if shape is not None else 0
    if memory:
        limits = resource.getrlimit(resource.RLIMIT_AS)
        soft = _virtual_size() + memory
        if limits[1] != resource.RLIM_INFINITY:
            soft = min(soft, limits[1])
        if limits[0] != resource.RLIM_INFINITY:
            soft = min(soft, limits[0])
        resource.setrlimit(resource.RLIMIT_AS, (soft, limits[1]))
    try:
        yield memory
    finally:
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_AS, limits)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def explain_memory_error(payload: bytes, memory: int) -> bytes:
    """A job's C{MemoryError} report, saying it went past the memory it asked for."""
    report = json.loads(payload)
    if report.get("type") != "MemoryError":
        return payload
    report["message"] = (
        f"the job asked for memory={format_size(memory)} and went past it (its address-space limit"
        f" on {socket.gethostname()}); ask for more memory in its resources"
        + (f" ({report['message']})" if report.get("message") else "")
    )
    report["memory"] = memory
    lines = report.get("traceback", "").rstrip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        lines[-1] = f"MemoryError: {report['message']}"
        report["traceback"] = "\n".join(lines) + "\n"
    return json.dumps(report).encode("utf-8")


def _missing() -> Exception:
    return LookupError("the worker did not send the job's function (a cw bug; please report it)")
