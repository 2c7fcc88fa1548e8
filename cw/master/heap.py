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
started and again a little after workers join or leave: the objects of
registered connections then sit in the permanent generation, which no
collection walks, and full collections only walk what came later (queued
jobs, results in flight).  After workers join, the young generations are
collected and the rest frozen (cheap: no walk of the old objects, so the
job traffic that follows a burst of registrations meets no long pause).
After workers leave, everything is unfrozen and collected once before
freezing again, so that the cycles of the connections gone are freed
rather than kept forever.  Only the C{cw-master} process does this
(L{cw.master.service.makeService}): never a process that merely embeds a
L{cw.master.service.Master} (tests).

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

log = Logger(namespace="cw.master")

#: Seconds after the first worker joins or leaves (of a burst) before the
#: heap is frozen again: a burst of registrations costs one full collection
#: per this many seconds, not one per connection.
SETTLE = 2.0


class HeapKeeper:
    """
    Keep the master's long-lived objects out of the garbage collector's walks.

    @param clock: schedules the refreeze (C{IReactorTime}).
    @param settle: seconds from a change in the workers to the refreeze.
    @param collector: the C{gc} module (tests pass a recorder).
    """

    def __init__(self, clock, settle: float = SETTLE, collector=gc) -> None:
        self.clock = clock
        self.settle = settle
        self.collector = collector
        #: How many times the heap was frozen (for the log and tests).
        self.freezes = 0
        self._call = None
        #: The pending refreeze collects everything first (workers left).
        self._full = False

    def freeze(self, full: bool = True) -> None:
        """
        Freeze the objects alive now.  C{full}: unfreeze and collect
        everything first (a walk of every object, frozen ones included),
        else collect only the young generations.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._full = False
        collector = self.collector
        if full:
            collector.unfreeze()
            collector.collect()
        else:
            collector.collect(1)
        collector.freeze()
        self.freezes += 1
        if self.freezes == 1:
            log.info(
                "Froze {n:,} long-lived objects out of the garbage collector's walks"
                " (again after workers join or leave)",
                n=collector.get_freeze_count(),
            )

    def joined(self) -> None:
        """Workers joined: freeze again within L{settle} seconds (once per burst)."""
        self._schedule()

    def left(self) -> None:
        """Workers left: within L{settle} seconds, collect everything, then freeze again."""
        self._full = True
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(self.settle, lambda: self.freeze(self._full))

    def stop(self) -> None:
        """Cancel a pending refreeze (the master stops)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
