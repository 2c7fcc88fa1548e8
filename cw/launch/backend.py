"""
Choosing where C{cw.start} puts a cluster: SLURM or local processes.

The original chose SLURM whenever C{salloc} was on C{PATH}.  That sends
users of a login node (and test suites on a machine with the SLURM client
installed) to SLURM by accident, so cw asks instead:

  1. C{CW_BACKEND} in the environment (C{local} or C{slurm}) wins;
  2. otherwise SLURM is used only if a SLURM controller answers
     (C{scontrol ping} reports it UP within a few seconds);
  3. otherwise the cluster is local processes (L{cw.mp}).

Layer rule (cw.launch): imports cw.client, cw.master, cw.worker and below; never cw.cli.
"""

from __future__ import annotations

import contextlib

from cw.discovery import backend
from cw.launch import local as mp
from cw.launch import slurm


def _module():
    if backend() == "slurm":
        return slurm
    return mp


def start(nworkers: int = 1, *args, **kwargs):
    return _module().start(nworkers, *args, **kwargs)


def stop(*args, **kwargs):
    return _module().stop(*args, **kwargs)


@contextlib.contextmanager
def allocate(nworkers: int = 1, *args, **kwargs):
    module = _module()
    address = module.start(nworkers, *args, **kwargs)
    try:
        yield address
    finally:
        stop_kwargs = {k: kwargs[k] for k in ("port", "cluster") if k in kwargs}
        module.stop(**stop_kwargs)
