"""
Outgoing batches that flush when the reactor is idle.

Master, worker and client all turn many small records into few AMP boxes the
same way: records are appended to an L{Outbox}, and the first append after a
flush schedules the next flush for the reactor's next turn
(C{callLater(0)}).  A lone record therefore leaves immediately, with no timer
adding latency, while records produced in one burst share boxes; with
C{after_flush} pushing the transport (L{cw.wire.private.push}), the boxes
are written in that same turn, not on the next.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

from cw.core.records import BATCH_BYTES, batches

T = TypeVar("T")


class Outbox(Generic[T]):
    """
    Collect records and hand them to C{send} in batches of at most
    C{limit} bytes (as measured by C{size}) on the reactor's next turn.
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[list[T]], object],
        size: Callable[[T], int],
        limit: int = BATCH_BYTES,
        after_flush: Callable[[], object] | None = None,
    ) -> None:
        self._clock = clock
        self._send = send
        self._size = size
        self._limit = limit
        #: Called once after a flush sent something (to write it out now, L{cw.wire.private.push}).
        self._after_flush = after_flush
        self._records: list[T] = []
        self._call = None

    def add(self, record: T) -> None:
        self._records.append(record)
        self._schedule()

    def extend(self, records: Iterable[T]) -> None:
        self._records.extend(records)
        self._schedule()

    def send_now(self, records: Iterable[T]) -> None:
        """
        Send C{records} at once, after those collected (as C{extend} then
        L{flush}, without setting a timer only to cancel it: a lone
        result's hop costs one timer less).
        """
        self._records.extend(records)
        self.flush()

    def _schedule(self) -> None:
        if self._call is None and self._records:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send everything collected so far, now."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        records, self._records = self._records, []
        for batch in batches(records, self._size, self._limit):
            self._send(batch)
        if records and self._after_flush is not None:
            self._after_flush()

    def discard(self) -> list[T]:
        """Drop and return what has not been sent (the peer is gone)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        records, self._records = self._records, []
        return records

    def __len__(self) -> int:
        return len(self._records)
