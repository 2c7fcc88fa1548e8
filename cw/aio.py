"""
cw for asyncio programs: C{from cw.aio import AsyncClusterExecutor}.

The implementation is L{cw.client.aio} (see there for how it runs beside
the event loop); this module is its public name.

Layer rule: a front door above every layer, as C{cw.mp}: imports cw.client only.
"""

from __future__ import annotations

from cw.client.aio import AsyncClusterExecutor
from cw.errors import (
    JobCrashed,
    JobKilled,
    JobTimeout,
    MasterUnavailable,
    RemoteException,
    SubmitError,
    WorkerLost,
)

__all__ = [
    "AsyncClusterExecutor",
    "JobCrashed",
    "JobKilled",
    "JobTimeout",
    "MasterUnavailable",
    "RemoteException",
    "SubmitError",
    "WorkerLost",
]
