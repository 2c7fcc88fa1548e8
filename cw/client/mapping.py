"""
Mapping a function over inputs of any length with a bounded window of jobs
in flight, in order or as they finish, optionally with a progress bar.

Used by L{cw.client.ClusterExecutor.map} and C{map_unordered}; works with
any L{concurrent.futures.Executor}.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import collections
import itertools
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any


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

    def tick(self, failed: bool = False) -> None:
        """Count one finished job."""
        if self.bar is None:
            return
        if failed:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

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
    """
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be at least 1")
    deadline = None if timeout is None else time.monotonic() + timeout
    args = zip(*iterables)  # noqa: B905 - stops at the shortest, as Executor.map does
    bar = Progress(progress, _total(iterables))
    finished: queue.SimpleQueue = queue.SimpleQueue()
    window: collections.deque[futures.Future] = collections.deque()

    def launch(n: int | None) -> None:
        for item in itertools.islice(args, n):
            future = submit(fn, *item)
            future.add_done_callback(bar.done)
            if not ordered:
                future.add_done_callback(finished.put)
            window.append(future)

    def left() -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise futures.TimeoutError()
        return remaining

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
        if ordered:
            # Left in the window until it gives its result, so that a timeout
            # stops it too.
            value = window[0].result(left())
            window.popleft()
        else:
            try:
                future = finished.get(timeout=left())
            except queue.Empty:
                raise futures.TimeoutError() from None
            window.remove(future)
            value = future.result()
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
