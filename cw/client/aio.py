"""
L{AsyncClusterExecutor}: cw for asyncio programs (C{import cw.aio}).

    async with AsyncClusterExecutor(address) as ex:
        value = await ex.submit(fn, 1, 2)
        async for result in ex.map(fn, range(1000), buffersize=100):
            ...

How it runs: a bridge, never a blocking call on the event loop.  The
connection to the master is the blocking clients' (L{ClusterExecutor},
whose session and delivery engine this wraps): its Twisted reactor runs in
a thread of its own, started by crochet if no reactor runs yet (shared
with every other cw client of the process), or the reactor already running
(a Twisted program's; also Twisted's asyncio reactor running this very
loop).  Jobs are pickled on the loop; results are unpickled in the
executor's delivery thread and handed to the loop with
C{call_soon_threadsafe}.  The few calls that wait (connecting, C{status},
waiting for the master's room when the send window is full, shutting down)
run in a short-lived thread each, so the loop keeps serving other
coroutines throughout; once the executor is closed, only the reactor's
thread is left.

Cancelling a task that awaits a job cancels the job: a queued job leaves the
master's queue, a running job's process is killed.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent import futures
from typing import Any

from cw.client.executor import ClusterExecutor
from cw.client.mapping import Progress, _total
from cw.wire import commands as P

#: Jobs submitted in one go before the loop gets a turn (a map of many
#: jobs does not hold up the loop's other coroutines while it submits).
_SUBMIT_TURN = 200


async def _in_thread(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """
    Run the blocking C{func} in a thread of its own and await its outcome:
    not the loop's default executor, whose threads would outlive the
    executor.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if outcome.cancelled():
            return
        if ok:
            outcome.set_result(value)
        else:
            outcome.set_exception(value)

    def run() -> None:
        try:
            value = func(*args, **kwargs)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, value)

    thread = threading.Thread(target=run, name=f"cw-aio-{getattr(func, '__name__', 'call')}", daemon=True)
    thread.start()
    try:
        return await outcome
    finally:
        if outcome.done():
            thread.join()  # it has set the outcome and is ending: leave no thread behind


class AsyncClusterExecutor:
    """
    An asyncio executor whose jobs run on a cw cluster; use it as
    C{async with AsyncClusterExecutor(host) as ex:}.

    Takes the options of L{ClusterExecutor} (C{host}, C{port},
    C{connect_timeout}, C{secret_file}, C{insecure}, C{timeout},
    C{max_attempts}, C{weight}, C{master_timeout}); connects on entry
    (raising L{MasterUnavailable} if no master answers).  On a normal exit,
    waits for the jobs still outstanding; when the block raises, stops them.
    Job exceptions arrive as in L{ClusterExecutor}: the job's own class,
    also a L{RemoteException}.
    """

    def __init__(self, host: str | None = None, port: int = P.PORT, **options: Any) -> None:
        self._host = host
        self._port = port
        self._options = options
        self._executor: ClusterExecutor | None = None
        self._room: asyncio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        if self._executor is None:
            return f"<AsyncClusterExecutor {self._host or 'default master'} not started>"
        return "<Async" + repr(self._executor)[1:]

    async def __aenter__(self) -> AsyncClusterExecutor:
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.shutdown(kill=exc_type is not None)

    async def start(self) -> None:
        """Connect to the master (done by C{async with})."""
        if self._executor is None:
            self._room = asyncio.Lock()
            self._executor = await _in_thread(ClusterExecutor, self._host, self._port, **self._options)

    @property
    def executor(self) -> ClusterExecutor:
        """The blocking L{ClusterExecutor} underneath (its C{kill}, C{outstanding}...)."""
        if self._executor is None:
            raise RuntimeError("the AsyncClusterExecutor is not started: use 'async with'")
        if self._closed:
            raise RuntimeError("cannot schedule new jobs after shutdown")
        return self._executor

    async def _wait_for_room(self) -> None:
        """Flow control without blocking the loop (see L{Session.wait_for_room})."""
        session = self.executor.session
        if not session.full():
            return
        async with self._room:
            if session.full():
                await _in_thread(session.wait_for_room, lambda: self._closed)

    async def _outcome(self, future: futures.Future) -> Any:
        """
        Await a job's future; if the awaiting task is cancelled, cancel the
        job (withdrawn if queued, killed if running).
        """
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._executor.kill(future)
            raise

    async def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """
        Run C{fn(*args, **kwargs)} on the cluster and return its value.
        C{asyncio.create_task(ex.submit(...))} gives a future to await
        later; cancelling it cancels the job.
        """
        return await self.submit_with(fn, args, kwargs)

    async def submit_with(
        self,
        fn: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        priority: int | None = None,
    ) -> Any:
        """L{submit} with options for this job alone, as L{ClusterExecutor.submit_with}."""
        executor = self.executor
        await self._wait_for_room()
        future = executor.submit_with(
            fn, args, kwargs, timeout=timeout, max_attempts=max_attempts, priority=priority
        )
        return await self._outcome(future)

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        buffersize: int | None = None,
        progress: bool | dict = False,
    ) -> AsyncIterator[Any]:
        """
        C{async for result in ex.map(fn, inputs)}: results in input order.

        An input may be an async iterable (only one, then).  C{buffersize}
        keeps at most that many jobs in flight, submitting the next as each
        result is taken, so that endless inputs run in bounded memory
        (default: submit everything at once).  C{fn} is pickled once and
        cached on the workers, as in L{ClusterExecutor.map}.  A failed job
        raises from the iteration; leaving it early (C{break}, an
        exception, C{aclose()}) stops the jobs in flight.  C{progress}: a
        tqdm bar (C{tqdm.auto}: a widget in notebooks).
        """
        return self._map(fn, iterables, buffersize, True, progress)

    def map_unordered(
        self,
        fn: Callable,
        *iterables: Iterable,
        buffersize: int | None = None,
        progress: bool | dict = False,
    ) -> AsyncIterator[Any]:
        """Like L{map}, but yield each result as soon as its job finishes."""
        return self._map(fn, iterables, buffersize, False, progress)

    async def _map(
        self,
        fn: Callable,
        iterables: tuple,
        buffersize: int | None,
        ordered: bool,
        progress: bool | dict,
    ) -> AsyncIterator[Any]:
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be at least 1")
        executor = self.executor
        submit = executor._mapper(fn)
        inputs = _arguments(iterables)
        bar = Progress(progress, None if _is_async(iterables) else _total(iterables))
        #: Jobs in flight, in input order: asyncio future -> cw future.
        window: dict[asyncio.Future, futures.Future] = {}
        finished: asyncio.Queue = asyncio.Queue()

        def done(future: asyncio.Future) -> None:
            bar.tick(not future.cancelled() and future.exception() is not None)
            if not ordered:
                finished.put_nowait(future)

        async def launch(count: int | None) -> None:
            launched = 0
            while count is None or launched < count:
                try:
                    args = await inputs.__anext__()
                except StopAsyncIteration:
                    return
                await self._wait_for_room()
                future = submit(fn, *args)
                waiter = asyncio.wrap_future(future)
                waiter.add_done_callback(done)
                window[waiter] = future
                launched += 1
                if launched % _SUBMIT_TURN == 0:
                    await asyncio.sleep(0)

        try:
            await launch(buffersize)
            while window:
                if ordered:
                    waiter = next(iter(window))
                    await asyncio.wait((waiter,))  # cancelling this wait leaves the job to finally
                else:
                    waiter = await finished.get()
                del window[waiter]
                value = waiter.result()  # a failed job raises here
                waiter = None  # no reference to the result once it is yielded
                if buffersize is not None:
                    await launch(1)
                yield value
        finally:
            if window:
                executor.kill(*window.values())
                for waiter in window:
                    waiter.remove_done_callback(done)
                    waiter.cancel()
            bar.close()

    async def status(self) -> dict:
        """The master's status snapshot, as L{ClusterExecutor.status}."""
        return await _in_thread(self.executor.status)

    async def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """
        Refuse new jobs and close the connection: first wait for the
        outstanding jobs (C{wait}), or stop them (C{kill}: queued ones
        withdrawn, running ones killed).  Idempotent.
        """
        executor = self._executor
        if executor is None or self._closed:
            return
        self._closed = True
        if kill:
            executor.kill(*executor.outstanding())
        if wait or kill:
            await _in_thread(executor.shutdown, True)
        else:
            executor.shutdown(wait=False)


def _is_async(iterables: tuple) -> bool:
    return len(iterables) == 1 and hasattr(iterables[0], "__aiter__")


async def _arguments(iterables: tuple) -> AsyncIterator[tuple]:
    """The argument tuples of a map: from one async iterable, or zipped sync ones."""
    if _is_async(iterables):
        async for item in iterables[0]:
            yield (item,)
    else:
        if any(hasattr(it, "__aiter__") for it in iterables):
            raise TypeError("map takes one async iterable, or any number of (sync) iterables")
        for args in zip(*iterables):  # noqa: B905 - stops at the shortest, as Executor.map does
            yield args
