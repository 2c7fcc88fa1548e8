"""
The master process's heap and Python's cyclic garbage collector.

A master with thousands of worker connections holds a few hundred thousand
long-lived objects (about 45 per connection: its protocol, transport,
buffers, heartbeat and scheduler records).  Each full collection walks all
of them (50 to 110 ms with 2,000 connections), and the job traffic itself
triggers full collections: the jobs queued in a burst survive the young
generations.  Such a pause in the middle of a stream of tiny jobs costs
throughput and latency while doing nothing useful.

L{HeapKeeper} freezes (C{gc.freeze}) what the master holds once it has
started and again a little after connections come and go: the objects of
registered connections then sit in the permanent generation, which no
collection walks, and full collections only walk what came later (queued
jobs, results in flight).

  - After workers join, the young generations are collected and the rest
    frozen: cheap, no walk of the old objects.
  - Everything is unfrozen, collected and frozen again (a full walk) when
    a worker or client that was connected during a freeze has left (its
    connection's objects, frozen while it was alive, are garbage now, with
    whatever buffers they hold), or when the frozen objects have grown by
    more than L{GROWTH} since the last full walk (garbage frozen with them
    then stays bounded as CPython bounds what waits in its oldest
    generation).  A connection that came and went between two freezes
    (a status query) was never frozen: the collector frees it as usual.
  - A full walk waits for a freeze that finds the master idle (no job
    queued or running), so that it does not pause a stream of jobs; at
    most L{MAX_DEFER} seconds, and not past L{MAX_GROWTH}.

Only the C{cw-master} process does this (L{cw.master.service.makeService}):
never a process that merely embeds a L{cw.master.service.Master} (tests).

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

log = Logger(namespace="cw.master")

#: Seconds after the first connection of a burst comes or goes before the
#: heap is frozen again: a burst of registrations costs one freeze per this
#: many seconds, not one per connection.
SETTLE = 2.0

#: Growth of the frozen objects, as a share of those frozen by the last
#: full walk, past which the next idle freeze walks everything.
GROWTH = 0.25

#: ... and past which a freeze walks everything, idle or not.
MAX_GROWTH = 3.0

#: Seconds a full walk that is due may wait for the master to be idle.
MAX_DEFER = 30.0


class HeapKeeper:
    """
    Keep the master's long-lived objects out of the garbage collector's walks.

    @param clock: schedules the refreezes (C{IReactorTime}).
    @param busy: whether the master has jobs queued or running now.
    @param settle: seconds from a change in the connections to the refreeze.
    @param collector: the C{gc} module (tests pass a recorder).
    """

    def __init__(self, clock, busy=lambda: False, settle: float = SETTLE, collector=gc) -> None:
        self.clock = clock
        self.busy = busy
        self.settle = settle
        self.collector = collector
        #: How many times the heap was frozen (for the log and tests).
        self.freezes = 0
        self._call = None
        #: Since when a full walk is due (see L{left}, L{GROWTH}); None: it is not.
        self._due: float | None = None
        #: Objects frozen by the last full walk (see L{GROWTH}).
        self._after_full = 0

    def freeze(self, full: bool = True) -> None:
        """
        Freeze the objects alive now.  C{full}: unfreeze and collect
        everything first (a walk of every object, frozen ones included);
        else collect only the young generations, and walk everything
        only if a full walk is due and the master idle (or it waited
        long enough, see L{MAX_DEFER}).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        collector = self.collector
        if not full:
            collector.collect(1)
            collector.freeze()
            growth = collector.get_freeze_count() / max(self._after_full, 1) - 1
            if growth > GROWTH and self._due is None:
                self._due = self.clock.seconds()
            if self._due is not None:
                waited = self.clock.seconds() - self._due
                if growth > MAX_GROWTH or waited >= MAX_DEFER or not self.busy():
                    full = True
                else:
                    self._schedule()  # busy now: look again later
        if full:
            collector.unfreeze()
            collector.collect()
            collector.freeze()
            self._after_full = collector.get_freeze_count()
            self._due = None
        self.freezes += 1
        if self.freezes == 1:
            log.info(
                "Froze {n:,} long-lived objects out of the garbage collector's walks"
                " (again after connections come and go)",
                n=collector.get_freeze_count(),
            )

    def joined(self) -> None:
        """Workers joined: freeze again within L{settle} seconds (once per burst)."""
        self._schedule()

    def epoch(self) -> int:
        """A mark to give L{left} when the connection registered now leaves."""
        return self.freezes

    def left(self, epoch: int) -> None:
        """
        A worker or client that registered at C{epoch} left: if its objects
        were frozen since, a full walk is due (at the first idle freeze,
        within L{MAX_DEFER} seconds).
        """
        if self.freezes > epoch:
            if self._due is None:
                self._due = self.clock.seconds()
            self._schedule()

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(self.settle, self.freeze, False)

    def stop(self) -> None:
        """Cancel a pending refreeze (the master stops)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
