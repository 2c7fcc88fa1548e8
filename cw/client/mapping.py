"""
Mapping a function over inputs of any length with a bounded window of jobs
in flight, in order or as they finish, optionally with a progress bar.

Used by L{cw.client.ClusterExecutor.map} and C{map_unordered}; works with
any L{concurrent.futures.Executor}.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

from cw.errors import exception_fields, remote_error


class Progress:
    """
    A tqdm bar counting finished jobs, with failures shown beside it.  Does
    nothing when C{enabled} is false.
    """

    def __init__(self, enabled: bool | dict, total: int | None, desc: str = "cw") -> None:
        self.bar = None
        self.failed = 0
        if enabled:
            try:
                # Imported only when a bar is asked for: tqdm.auto probes for
                # Jupyter and its widgets, which takes a while.
                from tqdm.auto import tqdm
            except ImportError:
                raise ImportError("progress bars need tqdm: pip install tqdm") from None
            options = dict(enabled) if isinstance(enabled, dict) else {}
            options.setdefault("total", total)
            options.setdefault("desc", desc)
            options.setdefault("unit", "job")
            self.bar = tqdm(**options)

    def done(self, future: futures.Future) -> None:
        """Count a finished future (a cancelled one counts as done)."""
        self.tick(not future.cancelled() and future.exception() is not None)

    def tick(self, failed: bool | int = False, count: int = 1) -> None:
        """Count C{count} finished jobs (calls), C{failed} of them failed (True: one)."""
        if self.bar is None:
            return
        if failed:
            self.failed += int(failed)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(count)

    def grow(self) -> None:
        """One more job to wait for (when the total is not known up front)."""
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + 1
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _total(iterables: tuple[Iterable, ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


#: C{chunksize="auto"}: a chunk should run for about this many seconds.
AUTO_CHUNK_SECONDS = 0.02

#: C{chunksize="auto"}: the most calls one chunk carries.
AUTO_CHUNK_MAX = 10_000


def run_chunk(fn: Callable, chunk: list[tuple]) -> tuple[list, dict | None, float]:
    """
    Run C{fn(*args)} for each C{args} of C{chunk}, in order, in a job
    process: one job of a C{map(..., chunksize=N)}.

    Return C{(values, failure, seconds)}: the values of the calls made,
    the error report of the call that raised (None if none did; the calls
    after it are not made, as in the standard library's executors) and the
    seconds the calls took (for C{chunksize="auto"}).
    """
    start = time.perf_counter()
    values = []
    for args in chunk:
        try:
            values.append(fn(*args))
        except BaseException as e:
            return values, _failure_report(e), time.perf_counter() - start
    return values, None, time.perf_counter() - start


def _failure_report(e: BaseException) -> dict:
    """The error report of one call of a chunk, as a job process makes for a job."""
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    return {
        "type": type(e).__name__,
        "message": str(e),
        "traceback": "".join(traceback.format_exception(type(e), e, tb)),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **exception_fields(e),
    }


def check_chunksize(chunksize: int | str) -> None:
    """L{ValueError} unless C{chunksize} is a positive integer or C{"auto"}."""
    if chunksize == "auto":
        return
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f'chunksize must be an integer >= 1 or "auto", not {chunksize!r}')


def auto_chunksize(seconds: float, calls: int) -> int:
    """Calls per chunk so that one takes about L{AUTO_CHUNK_SECONDS}, given C{calls} took C{seconds}."""
    if calls < 1:
        return 1
    per_call = seconds / calls
    if per_call <= AUTO_CHUNK_SECONDS / AUTO_CHUNK_MAX:
        return AUTO_CHUNK_MAX
    return max(1, min(AUTO_CHUNK_MAX, int(AUTO_CHUNK_SECONDS / per_call)))


class _Chunks:
    """
    The argument tuples of a map cut into chunks (lists), thread-safe: of
    C{size} calls each, or, for C{"auto"}, one call first and then as many
    as L{auto_chunksize} makes of the measurements (L{measured}).
    """

    def __init__(self, args: Iterator[tuple], size: int | str) -> None:
        self.args = args
        self.auto = size == "auto"
        self.size = 1 if self.auto else size
        self.lock = threading.Lock()
        self.seconds = 0.0
        self.calls = 0

    def measured(self, outcome: tuple) -> None:
        """Fold a finished chunk's C{(values, failure, seconds)} into the size of the next ones."""
        values, failure, seconds = outcome
        if self.auto and failure is None and values:
            with self.lock:
                self.seconds += seconds
                self.calls += len(values)
                self.size = auto_chunksize(self.seconds, self.calls)

    def take(self) -> list[tuple]:
        """The next chunk (empty once the arguments are used up)."""
        with self.lock:
            return list(itertools.islice(self.args, self.size))


def bounded_map(
    submit: Callable[..., futures.Future],
    fn: Callable,
    iterables: tuple[Iterable, ...],
    *,
    timeout: float | None = None,
    buffersize: int | None = None,
    ordered: bool = True,
    progress: bool | dict = False,
    stop: Callable[[futures.Future], object] = futures.Future.cancel,
    chunksize: int | str = 1,
    submit_chunk: Callable[[list[tuple]], futures.Future] | None = None,
) -> Iterator[Any]:
    """
    Submit C{fn(*args)} for the items of C{iterables} through C{submit},
    keeping at most C{buffersize} jobs in flight (all at once if None), and
    return an iterator over the results: in input order, or as they finish
    when C{ordered} is false.  The first window is submitted before this
    returns, as L{concurrent.futures.Executor.map} does.  A failed job
    raises from the iterator; closing it early calls C{stop} on each future
    in flight (default: C{cancel()}; L{cw.client.ClusterExecutor} kills
    running jobs too).  C{timeout} bounds the whole iteration, counted from
    this call.  No result stays referenced here once yielded.

    With C{chunksize} above 1, C{chunksize} calls travel and run as one job
    (L{run_chunk}, submitted through C{submit_chunk(chunk)}, by default
    C{submit(run_chunk, fn, chunk)}), and C{buffersize} counts such jobs, as
    in the standard library; results are still yielded one by one, and a
    call that raised fails at its own item, after the items of its chunk
    before it.  C{"auto"} runs one call first and sizes the chunks from the
    measured duration of the calls so far, so that one takes about
    L{AUTO_CHUNK_SECONDS}.
    """
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be at least 1")
    check_chunksize(chunksize)
    args = zip(*iterables)  # noqa: B905 - stops at the shortest, as Executor.map does
    if chunksize == 1:
        return _map_single(
            submit, fn, args, timeout, buffersize, ordered, Progress(progress, _total(iterables)), stop
        )
    if submit_chunk is None:
        submit_chunk = functools.partial(submit, run_chunk, fn)
    bar = Progress(progress, _total(iterables))
    return _map_chunks(submit_chunk, _Chunks(args, chunksize), timeout, buffersize, ordered, bar, stop)


def _deadline(timeout: float | None) -> Callable[[], float | None]:
    """A function giving the seconds left before C{timeout} (from now) or raising L{futures.TimeoutError}."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise futures.TimeoutError()
        return remaining

    return left


def _next_done(
    window: collections.deque[futures.Future],
    finished: queue.SimpleQueue,
    ordered: bool,
    left: Callable[[], float | None],
) -> tuple[futures.Future, Any]:
    """
    Take the next finished future out of C{window}: its oldest if
    C{ordered}, else the first to finish (those put in C{finished} by
    their done callbacks); return it with its result, waiting at most
    C{left()} seconds (then L{futures.TimeoutError}).
    """
    if ordered:
        # Left in the window until it gives its result, so that a timeout
        # stops it too.
        future = window[0]
        value = future.result(left())
        window.popleft()
    else:
        try:
            future = finished.get(timeout=left())
        except queue.Empty:
            raise futures.TimeoutError() from None
        window.remove(future)
        value = future.result()
    return future, value


def _map_single(
    submit: Callable[..., futures.Future],
    fn: Callable,
    args: Iterator[tuple],
    timeout: float | None,
    buffersize: int | None,
    ordered: bool,
    bar: Progress,
    stop: Callable[[futures.Future], object],
) -> Iterator[Any]:
    """L{bounded_map} of one call per job."""
    left = _deadline(timeout)
    finished: queue.SimpleQueue = queue.SimpleQueue()
    window: collections.deque[futures.Future] = collections.deque()

    def launch(n: int | None) -> None:
        for item in itertools.islice(args, n):
            future = submit(fn, *item)
            future.add_done_callback(bar.done)
            if not ordered:
                future.add_done_callback(finished.put)
            window.append(future)

    try:
        launch(buffersize)
    except BaseException:
        for future in window:
            stop(future)
        bar.close()
        raise

    def take() -> Any:
        # The next result, in a frame of its own: once it is yielded, no
        # local variable of the generator below refers to it or its future.
        value = _next_done(window, finished, ordered, left)[1]
        if buffersize is not None:
            launch(1)
        return value

    def results() -> Iterator[Any]:
        try:
            yield None  # primed below: from here on, closing runs the cleanup
            while window:
                yield take()
        finally:
            for future in window:
                stop(future)
            bar.close()

    iterator = results()
    next(iterator)
    return iterator


def _map_chunks(
    submit_chunk: Callable[[list[tuple]], futures.Future],
    chunks: _Chunks,
    timeout: float | None,
    buffersize: int | None,
    ordered: bool,
    bar: Progress,
    stop: Callable[[futures.Future], object],
) -> Iterator[Any]:
    """
    L{bounded_map} of chunks of calls per job.  With C{"auto"} and no
    C{buffersize}, a thread of its own submits the rest once the first
    call has been measured, so that this returns at once.
    """
    left = _deadline(timeout)
    finished: queue.SimpleQueue = queue.SimpleQueue()
    window: collections.deque[futures.Future] = collections.deque()
    lock = threading.Lock()
    changed = threading.Condition(lock)
    #: Set when the map is left: nothing more is submitted.
    stopped = threading.Event()
    #: The thread submitting the rest (auto): whether it is still at it, what it raised.
    launcher: dict[str, Any] = {"busy": False, "error": None}

    def counter(n: int) -> Callable[[futures.Future], None]:
        def done(future: futures.Future) -> None:
            if future.cancelled():
                bar.tick(count=n)
            elif future.exception() is not None:
                bar.tick(count=n, failed=n)
            else:
                ok = len(future.result()[0])
                bar.tick(count=n, failed=n - ok)

        return done

    def launch(n: int | None) -> None:
        """Submit up to C{n} more chunks (all: None), unless the map was left."""
        launched = 0
        while n is None or launched < n:
            with lock:
                if stopped.is_set():
                    return
                chunk = chunks.take()
                if not chunk:
                    return
                future = submit_chunk(chunk)
                future.add_done_callback(counter(len(chunk)))
                if not ordered:
                    future.add_done_callback(finished.put)
                window.append(future)
                changed.notify_all()
            launched += 1

    def launch_rest(probe: futures.Future) -> None:
        try:
            futures.wait([probe])
            if probe.cancelled() or probe.exception() is not None:
                return  # the iterator raises at its item
            outcome = probe.result()
            chunks.measured(outcome)
            if outcome[1] is None:
                launch(None)
        except BaseException as e:
            launcher["error"] = e
        finally:
            with lock:
                launcher["busy"] = False
                changed.notify_all()

    def leave() -> None:
        stopped.set()
        with lock:  # a submit under way ends first
            pending = list(window)
        for future in pending:
            stop(future)
        bar.close()

    try:
        if chunks.auto and buffersize is None:
            launch(1)
            if window:
                launcher["busy"] = True
                threading.Thread(target=launch_rest, args=(window[0],), name="cw-map", daemon=True).start()
        else:
            launch(1 if chunks.auto else buffersize)
    except BaseException:
        leave()
        raise

    def take() -> tuple | None:
        """The next finished chunk's outcome, in order or not; None after the last."""
        with lock:
            while not window and launcher["busy"]:
                changed.wait(left())
            if not window:
                if launcher["error"] is not None:
                    raise launcher["error"]
                return None
        future, outcome = _next_done(window, finished, ordered, left)
        if outcome[1] is not None:
            failure = remote_error(getattr(future, "_jobid", None), outcome[1])
            return outcome[0], failure
        if buffersize is not None:
            chunks.measured(outcome)
            launch(buffersize - len(window))
        return outcome[0], None

    def results() -> Iterator[Any]:
        try:
            yield None  # primed below: from here on, closing runs the cleanup
            while True:
                outcome = take()
                if outcome is None:
                    return
                values, failure = collections.deque(outcome[0]), outcome[1]
                outcome = None
                while values:
                    yield values.popleft()
                if failure is not None:
                    raise failure
        finally:
            leave()

    iterator = results()
    next(iterator)
    return iterator


def progress(fs: Iterable[futures.Future], desc: str = "cw", **tqdm_options: Any) -> Iterator[futures.Future]:
    """
    Yield the futures as they complete (like L{futures.as_completed}) while
    a tqdm bar shows done, failed, rate and time left.
    """
    fs = list(fs)
    bar = Progress(dict(tqdm_options) or True, len(fs), desc)
    try:
        for future in futures.as_completed(fs):
            bar.done(future)
            yield future
    finally:
        bar.close()
