"""
The client: a session with the master over the reactor thread
(L{cw.client.session}), the L{ClusterExecutor} (L{cw.client.executor}), the
original L{ClientThread} (L{cw.client.thread}), bounded maps
(L{cw.client.mapping}) and how an executor displays (L{cw.client.display});
layers over the executor, imported only by their public names: asyncio
(L{cw.client.aio}, C{cw.aio}) and joblib (L{cw.client.joblib_backend},
C{cw.joblib}).  Imports cw.wire, cw.core, cw.discovery; never
cw.master, cw.worker, cw.launch or cw.cli.

Every public name of C{cw.client}
before the layered layout is re-exported here.
"""

from __future__ import annotations

from cw.client.executor import (
    ClusterExecutor,
    ClusterFuture,
    SlurmExecutor,
)
from cw.client.mapping import (
    Progress,
    bounded_map,
    progress,
)
from cw.client.session import (
    ClientProtocol,
    JobOutput,
    Session,
    master_status,
    wait_for_workers,
)
from cw.client.thread import (
    BaseClientThread,
    Client,
    ClientThread,
)
from cw.errors import (
    AuthenticationFailed,
    IncompatibleWorker,
    JobCrashed,
    JobKilled,
    JobTimeout,
    MasterUnavailable,
    RemoteException,
    SecretError,
    SubmitError,
    Unschedulable,
    VersionConflict,
    WorkerLost,
)

__all__ = [
    "AuthenticationFailed",
    "BaseClientThread",
    "Client",
    "ClientProtocol",
    "ClientThread",
    "ClusterExecutor",
    "ClusterFuture",
    "IncompatibleWorker",
    "JobCrashed",
    "JobKilled",
    "JobOutput",
    "JobTimeout",
    "MasterUnavailable",
    "Progress",
    "RemoteException",
    "SecretError",
    "Session",
    "SlurmExecutor",
    "SubmitError",
    "Unschedulable",
    "VersionConflict",
    "WorkerLost",
    "bounded_map",
    "master_status",
    "progress",
    "wait_for_workers",
]
