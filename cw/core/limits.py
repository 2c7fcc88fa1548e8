"""
Decisions on connection limits: how many unauthenticated connections may wait
and which to drop (L{Admission}).  Pure: the descriptor limit of the process is
read and raised in cw.wire.limits.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

#: Connections that may wait to authenticate at once by default (at most a
#: quarter of the descriptor limit): enough for a few hundred workers of
#: one SLURM job connecting together, while idle connections cost at most
#: 16 KiB each.
MAX_PENDING = 1024


#: Largest soft limit asked for when the hard limit is unlimited.
UNLIMITED = 1 << 20


def default_max_pending(descriptors: int, asked: int | None = None) -> int:
    """
    How many connections may wait to authenticate: C{asked} (default
    L{MAX_PENDING}), but never more than a quarter of C{descriptors}.
    """
    quarter = max(1, descriptors // 4)
    return min(MAX_PENDING if asked is None else asked, quarter)


def default_per_address(max_pending: int) -> int:
    """How many of the waiting connections may come from one address: a quarter."""
    return max(1, max_pending // 4)


class Admission:
    """
    The connections waiting to authenticate, oldest first, and which to
    drop when one more arrives (see the module docstring).  Connections are
    any hashable objects; addresses any hashable names of their source.
    """

    def __init__(self, max_pending: int, per_address: int) -> None:
        if max_pending < 1 or per_address < 1:
            raise ValueError("max_pending and per_address must be at least 1")
        self.max_pending = max_pending
        self.per_address = per_address
        self._waiting: dict[Hashable, Hashable] = {}
        self._by_address: dict[Hashable, dict[Hashable, None]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator:
        return iter(list(self._waiting))

    def __contains__(self, connection: Hashable) -> bool:
        return connection in self._waiting

    def waiting_from(self, address: Hashable) -> int:
        return len(self._by_address.get(address, ()))

    def admit(self, connection: Hashable, address: Hashable) -> list[tuple[Hashable, str]]:
        """
        Count a new unauthenticated C{connection} from C{address}; return
        the waiting connections to drop to make room, each with the reason
        to log.
        """
        dropped = []
        if self.waiting_from(address) >= self.per_address:
            oldest = next(iter(self._by_address[address]))
            self.pop(oldest)
            dropped.append(
                (
                    oldest,
                    f"over {self.per_address} connections from one address were waiting to"
                    " authenticate; this one waited longest (--max-pending-per-address)",
                )
            )
        if len(self._waiting) >= self.max_pending:
            busiest = max(self._by_address.values(), key=len)
            oldest = next(iter(busiest))
            self.pop(oldest)
            dropped.append(
                (
                    oldest,
                    f"over {self.max_pending} connections were waiting to authenticate;"
                    " this one waited longest of the busiest address (--max-pending)",
                )
            )
        self._waiting[connection] = address
        self._by_address.setdefault(address, {})[connection] = None
        return dropped

    def pop(self, connection: Hashable, default: object = None) -> object:
        """Forget C{connection} (it authenticated or closed); return its address."""
        address = self._waiting.pop(connection, default)
        if connection in self._by_address.get(address, ()):
            same = self._by_address[address]
            del same[connection]
            if not same:
                del self._by_address[address]
        return address
