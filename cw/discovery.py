"""
Finding the master: an address given, C{CW_MASTER}, this user's SLURM master
(its C{master.json} address file, else C{squeue}), else localhost; and which
backend (local or SLURM) is in use.  Imports only cw.core and cw.errors.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cw.core.config import MASTER_WAIT as MASTER_WAIT  # seconds a worker waits for its master
from cw.core.records import PORT
from cw.errors import (
    SlurmError,
)

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


MASTER_JOB = "cmaster"


WORKER_JOB = "cworkers"


#: The directory name of the cluster that has no name (jobs C{cmaster}, C{cworkers}).
DEFAULT_CLUSTER = "default"


#: Seconds L{master_host} waits for a master job that is queued or starting
#: (C{CW_MASTER_WAIT}).
MASTER_HOST_WAIT = 300.0


#: Job states in which a job no longer runs (see C{squeue --states}).
FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


#: The prefix of the master job's comment that carries its address.
_COMMENT = "cw-master="


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def cluster_name(cluster: str | None = None) -> str:
    """
    The cluster's name: C{cluster}, else C{CW_SLURM_CLUSTER}, else C{""}
    (the default cluster).  Raises L{SlurmError} for a name that is not
    letters, digits, C{.}, C{_} and C{-}.
    """
    name = os.environ.get("CW_SLURM_CLUSTER", "") if cluster is None else cluster
    name = name.strip()
    if name and not _NAME.match(name):
        raise SlurmError(
            f"bad cluster name {name!r}: use up to 64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def job_names(cluster: str | None = None) -> tuple[str, str]:
    """The names of the master job and the worker job of C{cluster}."""
    name = cluster_name(cluster)
    suffix = f"-{name}" if name else ""
    return MASTER_JOB + suffix, WORKER_JOB + suffix


def cluster_dir(cluster: str | None = None) -> Path:
    """
    The cluster's directory on the shared filesystem: C{$CW_SLURM_DIR/NAME},
    default C{~/.cw/slurm/NAME} (NAME is C{default} for the default cluster).
    """
    base = os.environ.get("CW_SLURM_DIR") or os.path.join(os.path.expanduser("~"), ".cw", "slurm")
    return Path(base).absolute() / (cluster_name(cluster) or DEFAULT_CLUSTER)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} is not on PATH: is this a SLURM login node? (load SLURM's module first)")
    return path


def run_slurm(args: list[str], input: str | None = None, timeout: float = 30) -> str:
    """Run a SLURM command; its stdout, or L{SlurmError} naming the command and its complaint."""
    try:
        out = subprocess.run(
            [_command(args[0]), *args[1:]], input=input, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer within {timeout} s: is slurmctld up?") from None
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(args[:2])} failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


def squeue_jobs(job_ids: Sequence[str], fields: str, every_task: bool = False) -> str:
    """
    What C{squeue} says about C{job_ids}, finished ones included, one line
    a job in its format C{fields} (C{-o}); jobs it has forgotten are left
    out.  With C{every_task}, one line per task of a job array (C{-r}).
    Raises L{SlurmError} if squeue fails otherwise.
    """
    try:
        tasks = ["-r"] if every_task else []
        return run_slurm(["squeue", "-h", *tasks, "-t", "all", "-j", ",".join(job_ids), "-o", fields])
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return ""  # all of them finished long ago
        raise


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """
    The state (C{RUNNING}, C{PENDING}, ...) of each of C{job_ids} that
    C{squeue} still knows; jobs it has forgotten are left out.
    """
    if not job_ids:
        return {}
    states = {}
    for line in squeue_jobs(job_ids, "%i %T").splitlines():
        fields = line.split()
        if len(fields) == 2:
            states[fields[0]] = fields[1]
    return states


def active_jobs(job_ids: Sequence[str]) -> dict[str, str]:
    """Those of C{job_ids} that are pending, running or ending, with their states."""
    return {i: s for i, s in job_states(job_ids).items() if s not in FINISHED_STATES}


def master_info(cluster: str | None = None, verify: bool = True) -> dict | None:
    """
    Where the cluster's master listens, or None if it does not run (yet).

    Read from C{master.json} in L{cluster_dir}: C{host}, C{port}, C{address}
    (C{HOST:PORT}), C{secret_file}, C{job_id}.  If C{verify}, the job named
    there must still be active in C{squeue} (a master job killed outright
    leaves its file behind).  Without the file, C{squeue} is asked for this
    user's running master job, whose comment holds its address.
    """
    info = _read_json(cluster_dir(cluster) / "master.json")
    if info is not None and info.get("host") and info.get("port"):
        if not verify or shutil.which("squeue") is None:
            return info
        if active_jobs([str(info.get("job_id"))]):
            return info
        return None
    return _master_from_squeue(cluster)


def _master_from_squeue(cluster: str | None) -> dict | None:
    if shutil.which("squeue") is None:
        return None
    name = job_names(cluster)[0]
    out = run_slurm(["squeue", "-h", "-u", getpass.getuser(), "-n", name, "-t", "RUNNING", "-o", "%i|%B|%k"])
    for line in out.splitlines():
        job_id, _, rest = line.partition("|")
        node, _, comment = rest.partition("|")
        if comment.startswith(_COMMENT):
            host, _, port = comment[len(_COMMENT) :].strip().rpartition(":")
            if host and port.isdigit():
                return _info(host, int(port), job_id=job_id.strip())
        elif node.strip() and not cluster_name(cluster):
            # An older master job without the comment: the default port.
            return _info(node.strip(), PORT, job_id=job_id.strip())
    return None


def _info(host: str, port: int, **extra) -> dict:
    return {"host": host, "port": port, "address": f"{host}:{port}", **extra}


def master_address(cluster: str | None = None) -> str:
    """
    The running master's address as C{HOST:PORT}; raises L{SlurmError}
    saying what to do if it does not run.
    """
    info = master_info(cluster)
    if info is None:
        raise SlurmError(_no_master(cluster))
    return info["address"]


def master_host(cluster: str | None = None, timeout: float | None = None) -> str:
    """
    The node running this user's master job (C{cmaster}), for
    C{ClientThread(callback, host)}: just the host when the master listens
    on the default port (as the original's did), else C{HOST:PORT}.

    If the master job is in C{squeue} but its master does not listen yet
    (the job is pending or starting, as right after C{slurm.py start}),
    wait for it, up to C{timeout} seconds (default C{CW_MASTER_WAIT}, else
    L{MASTER_HOST_WAIT}), saying so once on stderr.  Raises L{SlurmError}
    if there is no such job, or it does not start in time.
    """
    info = master_info(cluster)
    if info is None:
        jobs = master_jobs(cluster)
        if not jobs:
            raise SlurmError(_no_master(cluster))
        if timeout is None:
            timeout = float(os.environ.get("CW_MASTER_WAIT", MASTER_HOST_WAIT))
        name = job_names(cluster)[0]
        listed = ", ".join(f"{job_id} {state}" for job_id, state in jobs.items())
        print(
            f"cw: the master job {name!r} ({listed}) has not started its master yet;"
            f" waiting up to {timeout:g} s for it",
            file=sys.stderr,
            flush=True,
        )
        info = wait_for_master(cluster, timeout)
    return info["host"] if int(info["port"]) == PORT else info["address"]


def master_jobs(cluster: str | None = None) -> dict[str, str]:
    """This user's active master jobs of the cluster in C{squeue}, by id, with their states."""
    if shutil.which("squeue") is None:
        return {}
    name = job_names(cluster)[0]
    out = run_slurm(["squeue", "-h", "-u", getpass.getuser(), "-n", name, "-o", "%i %T"])
    jobs = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] not in FINISHED_STATES:
            jobs[fields[0]] = fields[1]
    return jobs


def _no_master(cluster: str | None) -> str:
    name = job_names(cluster)[0]
    flag = f" --name {cluster_name(cluster)}" if cluster_name(cluster) else ""
    return (
        f"no cw master job {name!r} of {getpass.getuser()} is running or queued (no address in"
        f" {cluster_dir(cluster) / 'master.json'}, none in squeue); start one with"
        f" 'cw-slurm{flag} start', or check its log in {cluster_dir(cluster)}"
    )


def _not_started(cluster: str | None, timeout: float) -> str:
    """Why no master answered after C{timeout} seconds of waiting: its job is queued, or there is none."""
    jobs = master_jobs(cluster)
    if not jobs:
        return f"gave up after {timeout:g} s: {_no_master(cluster)}"
    listed = ", ".join(f"{job_id} {state}" for job_id, state in jobs.items())
    return (
        f"the cw master job {job_names(cluster)[0]!r} ({listed}) did not start its master within"
        f" {timeout:g} s; see 'squeue --me' and its log in {cluster_dir(cluster)}, or wait longer"
        " (CW_MASTER_WAIT)"
    )


def wait_for_master(
    cluster: str | None = None, timeout: float = MASTER_WAIT, report=None, interval: float = 1.0
) -> dict:
    """
    Block until the cluster's master runs (L{master_info}); return its
    info.  C{master.json} is polled every C{interval} seconds, C{squeue} only
    when that file changes and otherwise at most every 30 s.  C{report} is
    called once with a message if the master is not there at first.  Raises
    L{SlurmError} after C{timeout} seconds.
    """
    path = cluster_dir(cluster) / "master.json"
    deadline = time.monotonic() + timeout
    seen = None
    asked = 0.0
    while True:
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = None
        now = time.monotonic()
        if stamp != seen or now - asked >= 30:
            seen, asked = stamp, now
            info = master_info(cluster)
            if info is not None:
                return info
            if report is not None:
                report(
                    f"waiting up to {timeout:g} s for the cw master job {job_names(cluster)[0]!r} ({path})"
                )
                report = None
        if now > deadline:
            raise SlurmError(_not_started(cluster, timeout))
        time.sleep(min(interval, max(deadline - now, 0.01)))


def locate_master(host: str | None = None, cluster: str | None = None) -> tuple[str, str]:
    """
    The master L{default_host} would use, and how it was found (for C{cw
    doctor}), without waiting for a master job that has not started:
    raises L{SlurmError} saying so, or that there is none.
    """
    if host:
        return host, "given with --master"
    env = os.environ.get("CW_MASTER")
    if env:
        return env, "from CW_MASTER"
    if backend() != "slurm":
        return "localhost", "the default: no --master, no CW_MASTER, SLURM not in use"
    info = master_info(cluster)
    if info is None:
        if master_jobs(cluster):
            raise SlurmError(_not_started(cluster, 0).replace("within 0 s", "yet"))
        raise SlurmError(_no_master(cluster))
    found = info["host"] if int(info["port"]) == PORT else info["address"]
    return found, f"this user's SLURM master job {info.get('job_id', '?')} ({cluster_dir(cluster)})"


#: A master address naming a file that holds the address (C{file:PATH}):
#: what C{cw-master --address-file PATH} writes once it listens.
FILE_PREFIX = "file:"


def read_address_file(path: str) -> str | None:
    """The address in C{path} (written by C{cw-master --address-file}), or None if there is none."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return text or None


def is_address_file(host: str | None) -> bool:
    """Whether C{host} names an address file (C{file:PATH}) rather than the master itself."""
    return bool(host) and host.startswith(FILE_PREFIX)


class MasterSource:
    """
    Where a client or worker finds its master again before each attempt to
    reconnect (the master may come back on another node or port): called,
    it returns the master's address now, or None if it cannot be found at
    the moment (keep the last one).  It may block briefly (a file read, or
    C{squeue}): call it off the reactor thread.
    """

    def __init__(self, find, description: str) -> None:
        self._find = find
        #: How the master is found, for messages ("the address file X").
        self.description = description

    def __call__(self) -> str | None:
        try:
            return self._find()
        except (OSError, SlurmError):
            return None

    def __str__(self) -> str:
        return self.description


def address_file_source(path: str) -> MasterSource:
    """The master whose address is in the file C{path}, read anew each time."""
    return MasterSource(lambda: read_address_file(path), f"the address file {path}")


def slurm_source(cluster: str | None = None) -> MasterSource:
    """The cluster's SLURM master (its C{master.json}, else C{squeue}), looked up anew each time."""

    def find() -> str | None:
        info = master_info(cluster)
        return None if info is None else info["address"]

    return MasterSource(find, f"SLURM ({cluster_dir(cluster) / 'master.json'})")


def master_source(host: str | None) -> MasterSource | None:
    """
    How to find the master named by C{host} (as for L{default_host}) again
    on reconnecting: an address file (C{file:PATH}, given or in
    C{CW_MASTER}) is read again, the SLURM master looked up again; None
    for an address given outright (it is retried as given).
    """
    chosen = host or os.environ.get("CW_MASTER") or ""
    if chosen.startswith(FILE_PREFIX):
        return address_file_source(chosen[len(FILE_PREFIX) :])
    if not chosen and backend() == "slurm":
        return slurm_source()
    return None


def default_host(host: str | None) -> str | None:
    """
    The master to use when none is given: C{CW_MASTER} from the
    environment, else the SLURM master when SLURM is in use, else
    C{localhost}.  A C{file:PATH} address stands for the address in that
    file (L{master_source}).
    """
    if host:
        return host
    env = os.environ.get("CW_MASTER")
    if env:
        return env
    if backend() == "slurm":
        return master_host()
    return "localhost"
