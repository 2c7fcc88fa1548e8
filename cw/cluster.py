"""
Choosing where C{cw.start} puts a cluster: SLURM or local processes.

The original chose SLURM whenever C{salloc} was on C{PATH}.  That sends
users of a login node (and test suites on a machine with the SLURM client
installed) to SLURM by accident, so cw asks instead:

  1. C{CW_BACKEND} in the environment (C{local} or C{slurm}) wins;
  2. otherwise SLURM is used only if a SLURM controller answers
     (C{scontrol ping} reports it UP within a few seconds);
  3. otherwise the cluster is local processes (L{cw.mp}).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess

BACKENDS = ("local", "slurm")


@functools.cache
def _slurm_controller_up() -> bool:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False
    try:
        out = subprocess.run([scontrol, "ping"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return " is UP" in out


def backend() -> str:
    """C{"slurm"} or C{"local"}: where L{start} would put a cluster."""
    chosen = os.environ.get("CW_BACKEND", "").strip().lower()
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"CW_BACKEND={chosen!r}: expected one of {', '.join(BACKENDS)}")
        return chosen
    return "slurm" if _slurm_controller_up() else "local"


def _module():
    if backend() == "slurm":
        from cw import slurm

        return slurm
    from cw import mp

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
