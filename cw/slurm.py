"""
SLURM support.

Finding the master (L{master_host}) works: it asks C{squeue} for this user's
running job named C{cmaster}.  Starting and stopping a cluster through
C{sbatch} is not built yet; L{start} and L{stop} say so.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess

from cw.errors import CWError

MASTER_JOB = "cmaster"
WORKER_JOB = "cworkers"


class SlurmError(CWError):
    """SLURM could not do what cw asked."""


def master_host(name: str = MASTER_JOB) -> str:
    """The node running this user's SLURM job C{name} (default C{cmaster})."""
    squeue = shutil.which("squeue")
    if squeue is None:
        raise SlurmError("squeue is not on PATH: is this a SLURM cluster?")
    out = subprocess.run(
        [squeue, "-h", "-u", getpass.getuser(), "-n", name, "-t", "RUNNING", "-o", "%B"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        raise SlurmError(f"squeue failed: {out.stderr.strip()}")
    hosts = out.stdout.split()
    if not hosts:
        raise SlurmError(
            f"no running SLURM job named {name!r} for {getpass.getuser()}; start a"
            " master job first (named cmaster, running twistd -n cw-master)"
        )
    return hosts[0]


def start(*args, **kwargs):
    raise NotImplementedError(
        "starting a cluster through SLURM is not available yet; set"
        " CW_BACKEND=local to start local processes instead"
    )


def stop(*args, **kwargs):
    raise NotImplementedError(
        "stopping a SLURM cluster is not available yet; cancel the cmaster and cworkers jobs with scancel"
    )


def allocate(*args, **kwargs):
    return start(*args, **kwargs)
