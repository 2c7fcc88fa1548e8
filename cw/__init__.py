"""
cw (cluster-workers): run many Python jobs on a cluster.

A client submits jobs (cloudpickled callables with their arguments) to a
master, which routes them to workers; results come back to the client.  See
README.rst for the architecture and L{cw.client} for the client API.

This module keeps the original top-level names: C{PORT}, C{randid()},
C{start()}, C{stop()}, C{allocate()}, C{slurm_master_host()},
C{is_slurm_available()}, and the submodules C{cw.mp} and C{cw.slurm} as
attributes (the original imported both here; cw imports them on first
use).  It imports nothing heavy, so that importing C{cw} installs no
reactor.

Layer rule: the package's front door, above every layer: imports
cw.core.records at once, and cw.launch and cw.discovery only inside the
functions that need them (so that C{import cw} stays light).
"""

from __future__ import annotations

import random

from cw.core.records import PORT

__version__ = "0.1.0"

__all__ = [
    "PORT",
    "randid",
    "start",
    "stop",
    "allocate",
    "slurm_master_host",
    "is_slurm_available",
    "mp",
    "slurm",
]

#: Submodules that are attributes of C{cw} without an import of their own.
_LAZY_SUBMODULES = ("mp", "slurm")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib  # only when asked: cw.mp and cw.slurm load Twisted

        return importlib.import_module(f"cw.{name}")
    raise AttributeError(f"module 'cw' has no attribute {name!r}")


def randid() -> int:
    """A random 128-bit integer, for use as a job id."""
    return random.getrandbits(128)


def start(nworkers: int = 1, *args, **kwargs):
    """
    Start a cluster of C{nworkers} workers and a master: under SLURM when
    SLURM is in use here, else as local processes (see L{cw.launch.backend}).
    """
    from cw.launch import backend as cluster  # lazily: `import cw` loads no reactor

    return cluster.start(nworkers, *args, **kwargs)


def stop(*args, **kwargs):
    """Stop what L{start} started."""
    from cw.launch import backend as cluster  # lazily: `import cw` loads no reactor

    return cluster.stop(*args, **kwargs)


def allocate(nworkers: int = 1, *args, **kwargs):
    """Context manager: L{start} on enter, L{stop} on exit."""
    from cw.launch import backend as cluster  # lazily: `import cw` loads no reactor

    return cluster.allocate(nworkers, *args, **kwargs)


def slurm_master_host(cluster: str | None = None) -> str:
    """
    The host running this user's SLURM master job (C{cmaster}; with a
    cluster name, or C{CW_SLURM_CLUSTER}, C{cmaster-NAME}); C{HOST:PORT} if
    its master does not listen on the default port.  See L{cw.slurm}.
    """
    from cw import discovery  # lazily: `import cw` stays light

    return discovery.master_host(cluster)


def is_slurm_available() -> bool:
    """
    Whether L{start} and clients given no host use SLURM: C{CW_BACKEND}
    (C{slurm} or C{local}) if set, else whether a SLURM controller answers
    (see L{cw.launch.backend}; having C{salloc} on C{PATH} is not enough).
    """
    from cw import discovery  # lazily: `import cw` stays light

    return discovery.backend() == "slurm"
