"""
A joblib backend that runs C{Parallel} calls on a cw cluster (C{import
cw.joblib} registers it as C{"cw"}):

    import cw.joblib
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="cw", master="node12"):
        results = Parallel(n_jobs=-1)(delayed(f)(i) for i in range(1000))

C{n_jobs=-1} is the cluster's slot count (C{-2}, one fewer, and so on).
Tasks go in joblib's batches, sized by joblib's own auto-batching (batches
of about 0.2 to 2 s), one cw job per batch.  A batch whose tasks share one
function sends that function once per C{Parallel} call (cached on the
workers, as L{ClusterExecutor.map} does), and each job carries only the
tasks' arguments.  A task's exception reaches the caller as its own class
(also a L{RemoteException}); C{return_as="generator"} and
C{"generator_unordered"} work.  Nested C{Parallel} calls inside a task run
sequentially (a task holds one slot).

Options of C{parallel_config} for this backend: C{master} (the master's
address, as C{ClusterExecutor}'s C{host}), C{executor} (an open
L{ClusterExecutor} to use instead of a connection per C{Parallel} call),
and any other L{ClusterExecutor} option (C{port}, C{secret_file},
C{insecure}, C{timeout}, C{max_attempts}, C{weight}...).

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

from joblib.parallel import (
    AutoBatchingMixin,
    BatchedCalls,
    ParallelBackendBase,
    SequentialBackend,
    parallel_config,
    register_parallel_backend,
)

from cw.client.executor import ClusterExecutor
from cw.client.session import job_options, master_status, pickle_function
from cw.discovery import default_host
from cw.wire import commands as P

#: The name the backend is registered under.
NAME = "cw"


class _SameFunction:
    """
    A cw job's cached function: run one batch of tasks that share
    C{function}, given their C{(args, kwargs)}; nested C{Parallel} calls run
    sequentially, as in the job process a task holds one slot.
    """

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, calls: list[tuple[tuple, dict]]) -> list:
        with parallel_config(backend="sequential"):
            return [self.function(*args, **kwargs) for args, kwargs in calls]


def _run_tasks(tasks: list[tuple[Any, tuple, dict]]) -> list:
    """A cw job: a batch of tasks with different functions."""
    with parallel_config(backend="sequential"):
        return [function(*args, **kwargs) for function, args, kwargs in tasks]


def cluster_slots(status: dict) -> int:
    """How many jobs the cluster runs at once: its workers' slots (draining ones aside)."""
    return sum(w["slots"] for w in status["workers"] if not w.get("draining"))


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """
    The C{"cw"} joblib backend (see the module's docstring).  joblib makes
    one per C{parallel_config} block and calls C{configure} at the start of
    each C{Parallel} call (this connects, unless given an C{executor}) and
    C{terminate} at its end (this disconnects).
    """

    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_timeout = True
    uses_threads = False
    supports_sharedmem = False

    def __init__(
        self,
        master: str | None = None,
        *,
        executor: ClusterExecutor | None = None,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self.master = master
        self.options = options
        self._given = executor
        self._executor: ClusterExecutor | None = executor
        self._lock = threading.Lock()
        #: This call's task functions, by id, with the key of their cached
        #: form (the function is kept, so that its id stays its own), and
        #: the cached forms by key: tasks made by C{delayed} each have a
        #: function object of their own, which all pickle alike.
        self._keys: dict[int, tuple[Any, bytes]] = {}
        self._pickles: dict[bytes, bytes] = {}
        self._options = b""

    # Sizing

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        return max(self._slots() + 1 + n_jobs, 1)

    def _slots(self) -> int:
        if self._executor is not None:
            status = self._executor.status()
        else:
            auth = {k: self.options[k] for k in ("secret_file", "insecure") if k in self.options}
            status = master_status(default_host(self.master), self.options.get("port", P.PORT), **auth)
        return cluster_slots(status)

    # A Parallel call

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **kwargs: Any) -> int:
        self.parallel = parallel
        if self._executor is None:
            self._executor = ClusterExecutor(self.master, **self.options)
        self._options = job_options(self._executor, None, None)
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Any, callback: Any = None) -> futures.Future:
        future = self._send(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _send(self, batch: Any) -> futures.Future:
        """One cw job for a joblib batch; its function cached when the batch has one."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("the cw joblib backend is not configured (used outside a Parallel call)")
        tasks = batch.items if isinstance(batch, BatchedCalls) else None
        if not tasks:
            return executor.submit(batch)
        keys = {self._key(function) for function, _, _ in tasks}
        if len(keys) > 1:
            return executor.submit(_run_tasks, tasks)
        (key,) = keys
        calls = [(args, kwargs) for _, args, kwargs in tasks]
        return executor._submit(tasks[0][0], (calls,), {}, self._options, (key, self._pickles[key]))

    def _key(self, function: Any) -> bytes:
        """The key of C{_SameFunction(function)}, cached on the workers; pickled once per call."""
        with self._lock:
            entry = self._keys.get(id(function))
            if entry is None:
                key, data = pickle_function(_SameFunction(function))
                self._pickles.setdefault(key, data)
                entry = self._keys[id(function)] = (function, key)
            return entry[1]

    def retrieve_result_callback(self, future: futures.Future) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed (or the call was interrupted): stop every job of this call."""
        executor = self._executor
        if executor is not None:
            executor.kill(*executor.outstanding())
        if not ensure_ready:
            self._close()

    def terminate(self) -> None:
        """The Parallel call is over: disconnect (unless the executor was given)."""
        self._close()
        self.reset_batch_stats()

    def _close(self) -> None:
        with self._lock:
            self._keys.clear()
            self._pickles.clear()
        executor, self._executor = self._executor, self._given
        if executor is not None and executor is not self._given:
            executor.kill(*executor.outstanding())
            executor.shutdown()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """Parallel calls inside a task run sequentially: the task holds one slot."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register() -> None:
    """Register the C{"cw"} backend with joblib (done by C{import cw.joblib})."""
    register_parallel_backend(NAME, ClusterBackend)
