"""
SLURM support: run a cw cluster as SLURM jobs, and find its master.

A cluster is two batch jobs submitted with C{sbatch}: the master job
(named C{cmaster}) runs one master; the worker job (named C{cworkers}) has
C{--ntasks=N} and runs one worker per task under C{srun}.  A cluster name
(C{cluster=}, C{CW_SLURM_CLUSTER}) suffixes both names (C{cmaster-NAME},
C{cworkers-NAME}), so that one user can run several clusters.

Each cluster has a directory on the shared filesystem, L{cluster_dir}
(C{$CW_SLURM_DIR/NAME}, default C{~/.cw/slurm/NAME}, where the default
cluster's NAME is C{default}).  It holds:

  - C{jobs.json}: the ids of the jobs L{start} submitted; L{stop} cancels
    exactly those (workers first), never jobs found by name;
  - C{master.json}: written by the master job once its master listens: the
    node, port and secret file the master uses (see L{master_info});
  - C{master-JOBID.log}, C{workers-JOBID.log}: the jobs' output.

Workers and clients read C{master.json}; without it (no shared home
directory) they ask C{squeue} for the running master job, whose comment the
master job sets to its address.  A worker started before its master waits
for it (L{wait_for_master}), for a bounded time.

The worker job asks SLURM for C{SIGTERM} a while before its time limit
(C{#SBATCH --signal=TERM@SECONDS}, sent to the C{srun} step, that is to the
workers).  A worker drains on C{SIGTERM}: it hands its unstarted jobs back to
the master and finishes its running ones, so a walltime loses no work.

A master with a state file (C{--state}) outlives any walltime: its job
asks for C{SIGUSR2} as long before its time limit (C{--signal=B:USR2@...},
to the batch shell, which is the master job's own process) and on it
submits a replacement master job (the same script, C{master.sbatch} in the
cluster directory).  The replacement, once it runs, asks the old master to
hand over (C{SIGTERM} to its batch step: it stops accepting, tells its
peers, commits the state file and exits), waits for the state file's lock,
then reloads the queue from it and publishes its own C{master.json}.  On
the same node it listens on the old master's port.  Workers and clients
find it as they found the first one.

Layer rule (cw.launch): imports cw.client, cw.master, cw.worker and below; never cw.cli.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from twisted.internet import defer, threads
from twisted.logger import globalLogBeginner, textFileLogObserver

from cw.client.session import Session, call_in_reactor
from cw.core.config import WALLTIME_WARNING as WALLTIME_WARNING
from cw.core.config import MasterConfig, PoolSpec, SlurmConfig, WorkerConfig, parse_argv
from cw.core.records import PORT
from cw.core.resources import parse_size
from cw.core.scaling import IDLE_TIMEOUT, PENDING_TIMEOUT, PoolBounds
from cw.discovery import _COMMENT, _info, _read_json, run_slurm, squeue_jobs
from cw.discovery import DEFAULT_CLUSTER as DEFAULT_CLUSTER
from cw.discovery import FINISHED_STATES as FINISHED_STATES
from cw.discovery import MASTER_HOST_WAIT as MASTER_HOST_WAIT
from cw.discovery import MASTER_JOB as MASTER_JOB
from cw.discovery import MASTER_WAIT as MASTER_WAIT
from cw.discovery import WORKER_JOB as WORKER_JOB
from cw.discovery import active_jobs as active_jobs
from cw.discovery import cluster_dir as cluster_dir
from cw.discovery import cluster_name as cluster_name
from cw.discovery import job_names as job_names
from cw.discovery import job_states as job_states
from cw.discovery import master_address as master_address
from cw.discovery import master_host as master_host
from cw.discovery import master_info as master_info
from cw.discovery import master_jobs as master_jobs
from cw.discovery import wait_for_master as wait_for_master
from cw.errors import SlurmError
from cw.launch.twistd import run_twistd
from cw.master.pool import (
    POLL_INTERVAL,
    StatusSource,
    launcher_factory,
    read_pool_file,
    start_pools,
)
from cw.master.store import locked
from cw.system import polling, with_cw_on_path, write_atomically
from cw.wire.commands import GetStatus
from cw.wire.secret import load_secret, secret_path

#: C{cw-slurm}'s defaults, which L{start} and L{stop} share.
_DEFAULTS = SlurmConfig()

#: Seconds a replacement master waits for the master it replaces to hand
#: its state file over.
HANDOVER_WAIT = 300

#: The master job's script, kept in the cluster directory so that the
#: master job can submit its own replacement.
MASTER_SCRIPT = "master.sbatch"


# --- names and places -----------------------------------------------------


#: Why C{--max-workers} and C{--pool} do not go together.
_PER_POOL_BOUNDS = "--max-workers with --pool: give each pool its bounds (--pool NAME:min=0,max=4,...)"


def _write_json(path: Path, data: dict) -> None:
    """Write C{data} to C{path} atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data, indent=2) + "\n", tmp_suffix=f".{socket.gethostname()}")


def recorded_jobs(cluster: str | None = None) -> dict[str, list[str]]:
    """The job ids L{start} recorded: C{{"master": [...], "workers": [...]}}."""
    data = _read_json(cluster_dir(cluster) / "jobs.json") or {}
    return {kind: [str(i) for i in data.get(kind, [])] for kind in ("master", "workers")}


def recorded_pools(cluster: str | None = None) -> dict[str, str]:
    """The pools of the worker jobs L{start} recorded: C{{job id: pool definition}}."""
    data = _read_json(cluster_dir(cluster) / "jobs.json") or {}
    workers = set(recorded_jobs(cluster)["workers"])
    return {job: spec for job, spec in (data.get("pools") or {}).items() if job in workers}


def _record_jobs(
    cluster: str | None, jobs: dict[str, list[str]], pools: dict[str, str] | None = None
) -> None:
    path = cluster_dir(cluster) / "jobs.json"
    if pools is None:
        pools = recorded_pools(cluster)
    pools = {job: spec for job, spec in pools.items() if job in jobs["workers"]}
    if jobs["master"] or jobs["workers"]:
        _write_json(path, {**jobs, "pools": pools} if pools else jobs)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- talking to SLURM -----------------------------------------------------


def cancel(job_ids: Sequence[str], timeout: float = 60) -> None:
    """
    C{scancel} C{job_ids} (SIGTERM to their processes, SIGKILL after
    SLURM's KillWait) and wait, up to C{timeout} seconds, until none is
    active any more.  Raises L{SlurmError} if one still is.
    """
    alive = list(active_jobs(job_ids))
    if not alive:
        return
    run_slurm(["scancel", *alive])
    deadline = time.monotonic() + timeout
    for _ in polling(0.1, 1.0, factor=1.5):
        left = active_jobs(alive)
        if not left:
            return
        if time.monotonic() > deadline:
            raise SlurmError(
                "SLURM jobs "
                + ", ".join(f"{i} ({s})" for i, s in left.items())
                + f" were still active {timeout:g} s after scancel; check them with squeue"
            )


# --- finding the master ---------------------------------------------------


# --- batch scripts --------------------------------------------------------


def _environment(cluster: str, directory: Path, secret_file: str | None) -> list[str]:
    env = {
        # jobs run this very code
        "PYTHONPATH": with_cw_on_path(os.environ)["PYTHONPATH"],
        "CW_SLURM_DIR": str(directory.parent),
        "CW_SLURM_CLUSTER": cluster,
    }
    if secret_file:
        env["CW_SECRET_FILE"] = str(Path(secret_file).absolute())
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def _cd(cwd: str | None) -> str:
    """Go to the caller's directory (where jobs run, as locally), or fail saying why."""
    where = shlex.quote(cwd or os.getcwd())
    message = shlex.quote(
        "cw: cannot enter the directory cw-slurm was run from; run it from a directory that every node shares"
    )
    return f'cd {where} || {{ echo {message} "(node $(hostname))" >&2; exit 1; }}'


def _header(name: str, output: Path, time_limit: str | None, partition: str | None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={output}"]
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    return lines


def _extra(extra: Sequence[str]) -> list[str]:
    lines = []
    for option in extra:
        if any(c in option for c in "\n\r"):
            raise SlurmError(f"sbatch option {option!r} spans lines")
        lines.append(f"#SBATCH {option}")
    return lines


def master_script(
    cluster: str = "",
    master_options: Sequence[str] = (),
    *,
    directory: Path | None = None,
    port: int | None = None,
    python: str | None = None,
    cwd: str | None = None,
    secret_file: str | None = None,
    time_limit: str | None = None,
    partition: str | None = None,
    sbatch_options: Sequence[str] = (),
    walltime_warning: int = WALLTIME_WARNING,
) -> str:
    """
    The batch script of the master job: one task running
    C{python -m cw.slurm master-job}, which runs the master and publishes
    its address (see L{run_master_job}).  C{port} defaults to 5494 for the
    default cluster and to a free port for a named one.  C{sbatch_options}
    (C{--Xmaster}) become extra C{#SBATCH} lines.  A master with a state
    file (C{--state}) and a time limit is sent C{SIGUSR2}
    C{walltime_warning} seconds before it, and submits its replacement.
    """
    cluster = cluster_name(cluster)
    directory = directory or cluster_dir(cluster)
    if port is None:
        port = 0 if cluster else PORT
    options = list(master_options)
    given = parse_argv(MasterConfig, options, "cw-master")[0]
    if "port" not in given:
        options = ["--port", f"tcp:{port}", *options]
    if secret_file and "secret_file" not in given:
        options = ["--secret-file", str(Path(secret_file).absolute()), *options]
    lines = _header(job_names(cluster)[0], directory / "master-%j.log", time_limit, partition)
    lines.append("#SBATCH --ntasks=1")
    if time_limit and walltime_warning and "state" in given:
        lines.append(f"#SBATCH --signal=B:USR2@{walltime_warning}")
    lines += [*_extra(sbatch_options), ""]
    lines += [_cd(cwd), *_environment(cluster, directory, secret_file)]
    command = [python or sys.executable, "-m", "cw.slurm", "master-job", "--", *options]
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def worker_script(
    nworkers: int,
    cluster: str = "",
    worker_options: Sequence[str] = (),
    *,
    directory: Path | None = None,
    isolated: bool = False,
    docker_image: str | None = None,
    docker_args: str = "",
    python: str | None = None,
    docker_python: str = "python3",
    cwd: str | None = None,
    secret_file: str | None = None,
    time_limit: str | None = None,
    partition: str | None = None,
    sbatch_options: Sequence[str] = (),
    walltime_warning: int = WALLTIME_WARNING,
    master_wait: float = MASTER_WAIT,
    pool: PoolSpec | None = None,
) -> str:
    """
    The batch script of the worker job: C{--ntasks=nworkers} tasks (one per
    node if C{isolated}), each a worker under C{srun} with as many job slots
    as CPUs per task.  SLURM sends the workers SIGTERM C{walltime_warning}
    seconds before the time limit; they drain within that time.

    Without C{docker_image} each worker finds the master itself
    (C{cw.worker --slurm}, waiting up to C{master_wait} seconds).  With it,
    the script waits for the master once and runs each worker as
    C{docker run -i --rm --net=host DOCKER_ARGS IMAGE python3 -m cw.worker
    --master HOST:PORT}, with the secret file mounted read-only at the same
    path (the image must have cw installed).

    With C{pool}, the job is that pool's (L{pool_job}): named
    C{cworkers[-CLUSTER].POOL}, its size and options from the pool.
    """
    name = job_names(cluster)[1]
    if pool is not None:
        nworkers, worker_options, sbatch_options = pool_job(pool, worker_options, sbatch_options)
        name = f"{job_names(cluster)[1]}.{pool.name}"
    if nworkers < 1:
        raise SlurmError(f"a worker job needs at least one worker, not {nworkers}")
    cluster = cluster_name(cluster)
    directory = directory or cluster_dir(cluster)
    options = list(worker_options)
    given = parse_argv(WorkerConfig, options, "cw-worker")[0]
    if "procs" not in given:
        options = ["--procs", "${SLURM_CPUS_PER_TASK:-1}", *options]
    if walltime_warning and "drain_timeout" not in given:
        # Leave the workers time to report back before SLURM kills the job.
        options = ["--drain-timeout", str(max(walltime_warning - 30, walltime_warning // 2)), *options]
    if secret_file and "secret_file" not in given:
        options = ["--secret-file", str(Path(secret_file).absolute()), *options]
    lines = _header(name, directory / "workers-%j.log", time_limit, partition)
    lines.append(f"#SBATCH --ntasks={nworkers}")
    if isolated:
        lines.append("#SBATCH --ntasks-per-node=1")
    if walltime_warning:
        lines.append(f"#SBATCH --signal=TERM@{walltime_warning}")
    lines += [*_extra(sbatch_options), ""]
    lines += [_cd(cwd), *_environment(cluster, directory, secret_file)]
    quoted = " ".join(o if o == "${SLURM_CPUS_PER_TASK:-1}" else shlex.quote(o) for o in options)
    python = python or sys.executable
    if docker_image:
        wait = [python, "-m", "cw.slurm", "wait-master", "--timeout", f"{master_wait:g}"]
        lines.append(f"master=$({shlex.join(wait)}) || exit 1")
        docker = ["docker", "run", "-i", "--rm", "--net=host", *shlex.split(docker_args)]
        if secret_file:
            path = str(Path(secret_file).absolute())
            docker += ["-v", f"{path}:{path}:ro", "-e", f"CW_SECRET_FILE={path}"]
        command = [*docker, docker_image, docker_python, "-m", "cw.worker", "--master"]
        lines.append(f'srun {shlex.join(command)} "$master" {quoted}')
    else:
        command = [python, "-m", "cw.worker", "--slurm", "--slurm-wait", f"{master_wait:g}"]
        lines.append(f"srun {shlex.join(command)} {quoted}")
    return "\n".join(lines) + "\n"


def pool_job(
    pool: PoolSpec, worker_options: Sequence[str], sbatch_options: Sequence[str]
) -> tuple[int, list[str], list[str]]:
    """
    A pool's worker job: how many workers, their options (its tags, custom
    resources and memory, which SLURM's environment does not tell them)
    and the job's sbatch options (C{--cpus-per-task}, C{--mem-per-cpu},
    C{--gres}, with one worker per node so that a node's GPUs are its
    worker's).  Cores and GPUs the workers find in SLURM's environment.
    """
    options = list(worker_options)
    for tag in pool.tags:
        options += ["--tag", tag]
    for resource in pool.resources:
        options += ["--resource", resource]
    sbatch = list(sbatch_options)
    if pool.cpus:
        sbatch.append(f"--cpus-per-task={pool.cpus}")
    if pool.mem:
        options += ["--memory", pool.mem]
        per_cpu = -(-parse_size(pool.mem) // (pool.cpus or 1))
        sbatch.append(f"--mem-per-cpu={-(-per_cpu >> 20)}M")
    if pool.gres:
        sbatch += [f"--gres={pool.gres}", "--ntasks-per-node=1"]
    return pool.n, options, sbatch


def submit(script: str, directory: Path) -> str:
    """Submit C{script} with C{sbatch --parsable}; return the job id."""
    directory.mkdir(parents=True, exist_ok=True)
    out = run_slurm(["sbatch", "--parsable"], input=script)
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch did not print a job id but {out.strip()!r}")
    return job_id


# --- starting and stopping ------------------------------------------------


def start(
    nworkers: int = _DEFAULTS.workers,
    master: bool = True,
    workers: bool = True,
    master_options: list[str] = [],
    worker_options: list[str] = [],
    docker_image: str | None = None,
    docker_args: str = "",
    *,
    cluster: str | None = None,
    isolated: bool = False,
    time_limit: str | None = None,
    partition: str | None = None,
    master_sbatch: Sequence[str] = (),
    worker_sbatch: Sequence[str] = (),
    port: int | None = None,
    procs: int | None = None,
    secret_file: str | None = None,
    walltime_warning: int = WALLTIME_WARNING,
    master_wait: float = MASTER_WAIT,
    wait: bool = True,
    timeout: float = 300,
    master_time: str | None = _DEFAULTS.master_time,
    pools: Sequence[PoolSpec] = (),
    min_workers: int | None = None,
    max_workers: int | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    poll_interval: float = POLL_INTERVAL,
    pending_timeout: float = PENDING_TIMEOUT,
    pool_in_master: bool = True,
) -> str | None:
    """
    Submit the cluster's master job and a worker job of C{nworkers} workers
    (or only one of them: C{master}, C{workers}), record their ids, and
    (if C{wait}) wait up to C{timeout} seconds for the master to listen;
    return its address (C{HOST:PORT}), or None if not C{wait}.  Workers join
    as SLURM starts them.

    With C{max_workers}, the master job runs an adaptive pool instead of
    the worker job (C{nworkers} is ignored): it submits worker jobs of one
    worker each (job arrays for several at once) as work queues up, between
    C{min_workers} (default 0) and C{max_workers}, drains those idle for
    C{idle_timeout} seconds, replaces them ahead of their walltime
    (C{time_limit}, which then applies to the worker jobs only), and asks
    C{squeue} at most once per C{poll_interval} seconds (see
    L{cw.master.pool}, L{cw.core.scaling}).  Without C{pool_in_master}
    the pool is only described, for L{adapt} to run here.

    Each worker runs C{procs} jobs at once (default: as many as its task
    has CPUs).  C{master_time}: the master job's time limit, if not
    C{time_limit}; a master with C{--state} in C{master_options} replaces
    itself before it (see the module's docstring).  Calling it again with C{master=False} adds a worker job
    (e.g. to replace one that reaches its time limit).  Raises
    L{SlurmError} if the cluster's master job is already active and
    C{master} is set, or if the master does not listen in time (the jobs
    this call submitted are then cancelled again).

    With C{pools} (L{PoolSpec}, C{--pool}), each pool is a worker job of
    its own instead of the one of C{nworkers}; their ids and definitions
    are recorded (L{recorded_pools}).
    """
    cluster = cluster_name(cluster)
    directory = cluster_dir(cluster)
    directory.mkdir(parents=True, exist_ok=True)
    if not parse_argv(MasterConfig, master_options, "cw-master")[0].get("insecure"):
        # Check (or create the default) secret here, where a user sees the error.
        load_secret(secret_file)
        secret_file = str(secret_path(secret_file)[0])
    common = dict(directory=directory, secret_file=secret_file, time_limit=time_limit, partition=partition)
    jobs = recorded_jobs(cluster)
    submitted: list[str] = []
    master_common = common
    adaptive = [pool for pool in pools if pool.adaptive]
    if adaptive:
        if max_workers is not None:
            raise SlurmError(_PER_POOL_BOUNDS)
        if not master and pool_in_master:
            raise SlurmError("adaptive pools (--pool NAME:max=...) are run by a master job: drop -M")
        options = ["--procs", str(procs), *worker_options] if procs is not None else list(worker_options)
        entries = []
        for pool in adaptive:
            script = worker_script(
                1,
                cluster,
                options,
                docker_image=docker_image,
                docker_args=docker_args,
                sbatch_options=worker_sbatch,
                walltime_warning=walltime_warning,
                master_wait=master_wait,
                pool=pool,
                **common,
            )
            description = pool_description(
                script,
                directory,
                pool.min_workers or 0,
                pool.max_workers,
                idle_timeout if pool.idle_timeout is None else pool.idle_timeout,
                poll_interval if pool.poll_interval is None else pool.poll_interval,
                pending_timeout if pool.pending_timeout is None else pool.pending_timeout,
                walltime_warning,
            )
            entries.append({**description, "name": pool.name, "capacity": pool.capacity().to_json()})
        pool_file = directory / "pool.json"
        _write_json(pool_file, {"launcher": "slurm", "directory": str(directory), "pools": entries})
        if pool_in_master:
            master_options = [*master_options, "--pool-file", str(pool_file)]
        master_common = {**common, "time_limit": None}
        # The fixed pools' jobs are submitted below, as without adaptive ones.
        pools = [pool for pool in pools if not pool.adaptive]
        workers = workers and bool(pools)
    if max_workers is not None:
        if not master and pool_in_master:
            raise SlurmError("an adaptive pool (--max-workers) is run by a master job: drop -M")
        if pools:
            raise SlurmError(_PER_POOL_BOUNDS)
        if procs is not None:
            worker_options = ["--procs", str(procs), *worker_options]
        script = worker_script(
            1,
            cluster,
            worker_options,
            docker_image=docker_image,
            docker_args=docker_args,
            sbatch_options=worker_sbatch,
            walltime_warning=walltime_warning,
            master_wait=master_wait,
            **common,
        )
        pool_file = directory / "pool.json"
        _write_json(
            pool_file,
            pool_description(
                script,
                directory,
                min_workers or 0,
                max_workers,
                idle_timeout,
                poll_interval,
                pending_timeout,
                walltime_warning,
            ),
        )
        if pool_in_master:
            master_options = [*master_options, "--pool-file", str(pool_file)]
        master_common = {**common, "time_limit": None}
        workers = False
    if master:
        running = active_jobs(jobs["master"])
        if running:
            raise SlurmError(
                f"the cw master job {job_names(cluster)[0]!r} ({', '.join(running)}) is already active;"
                " stop it first ('cw-slurm stop'), or add workers with -M"
            )
        with contextlib.suppress(FileNotFoundError):
            (directory / "master.json").unlink()
        script = master_script(
            cluster,
            master_options,
            port=port,
            sbatch_options=master_sbatch,
            walltime_warning=walltime_warning,
            **{**master_common, "time_limit": master_time or master_common["time_limit"]},
        )
        write_atomically(directory / MASTER_SCRIPT, script)
        jobs["master"] = [submit(script, directory)]
        submitted += jobs["master"]
        _record_jobs(cluster, jobs)
    if workers and (nworkers > 0 or pools):
        if procs is not None:
            worker_options = ["--procs", str(procs), *worker_options]
        pool_ids = recorded_pools(cluster)
        for pool in pools or [None]:
            script = worker_script(
                nworkers,
                cluster,
                worker_options,
                isolated=isolated,
                docker_image=docker_image,
                docker_args=docker_args,
                sbatch_options=worker_sbatch,
                walltime_warning=walltime_warning,
                master_wait=master_wait,
                pool=pool,
                **common,
            )
            submitted.append(submit(script, directory))
            if pool is not None:
                pool_ids[submitted[-1]] = pool.spec()
            jobs["workers"] = [*active_jobs(jobs["workers"]), submitted[-1]]
            _record_jobs(cluster, jobs, pool_ids)
    if not wait:
        return None
    try:
        return wait_for_master(cluster, timeout)["address"]
    except BaseException:
        with contextlib.suppress(SlurmError):
            cancel(submitted)
        jobs = recorded_jobs(cluster)
        _record_jobs(cluster, {k: [i for i in v if i not in submitted] for k, v in jobs.items()})
        raise


def pool_description(
    script: str,
    directory: Path,
    min_workers: int,
    max_workers: int,
    idle_timeout: float,
    poll_interval: float,
    pending_timeout: float,
    walltime_warning: int,
) -> dict:
    """
    The adaptive pool's description for the master job
    (L{cw.master.pool.read_pool_file}): the one-worker batch script and the
    policy's bounds.  A worker drains C{walltime_warning} seconds before its
    end (SLURM's signal, or the pool's own if that does not come), and its
    replacement is submitted a minute earlier than that plus the queue wait
    seen, since SLURM may signal up to a minute early.
    """
    try:
        PoolBounds(min_workers=min_workers, max_workers=max_workers, idle_timeout=idle_timeout)
    except ValueError as e:
        raise SlurmError(f"bad adaptive pool: {e}") from None
    if poll_interval <= 0 or pending_timeout <= 0:
        raise SlurmError("--poll-interval and --pending-timeout must be positive")
    return {
        "launcher": "slurm",
        "script": script,
        "directory": str(directory),
        "min_workers": min_workers,
        "max_workers": max_workers,
        "idle_timeout": idle_timeout,
        "poll_interval": poll_interval,
        "pending_timeout": pending_timeout,
        "drain_lead": walltime_warning,
        "replace_lead": walltime_warning + 60,
    }


def _pool_records(cluster: str | None) -> list[Path]:
    """The files where adaptive pools record their jobs: C{pool-jobs.json}, C{pool-jobs-NAME.json}."""
    return sorted(cluster_dir(cluster).glob("pool-jobs*.json"))


def pool_jobs(cluster: str | None = None) -> list[str]:
    """The worker jobs (or array tasks, C{JOB_TASK}) the adaptive pools' master recorded."""
    ids: list[str] = []
    for path in _pool_records(cluster):
        ids += [str(i) for i in (_read_json(path) or {}).get("workers", [])]
    return ids


def _cancel_pool(cluster: str, timeout: float) -> None:
    """Cancel the pool's worker jobs (their workers drain) and wait for them to end."""
    ids = pool_jobs(cluster)
    jobs = sorted({i.split("_")[0] for i in ids})
    if jobs:
        with contextlib.suppress(SlurmError):
            run_slurm(["scancel", *jobs])
        deadline = time.monotonic() + timeout
        for _ in polling(0.1, 1.0, factor=1.5):
            out = squeue_jobs(jobs, "%i %T", every_task=True)
            left = [line for line in out.splitlines() if line.split()[-1] not in FINISHED_STATES]
            if not left or time.monotonic() > deadline:
                break
    for path in _pool_records(cluster):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def stop(
    master: bool = True,
    workers: bool = True,
    *,
    cluster: str | None = None,
    timeout: float = _DEFAULTS.timeout,
) -> None:
    """
    Cancel the jobs L{start} recorded for the cluster: the worker jobs
    first (their workers drain: unstarted jobs go back to the master), and
    once they have ended (or after C{timeout} seconds) the master job.  An
    adaptive pool's master job goes first (it would start workers again),
    then the worker jobs it recorded.
    """
    cluster = cluster_name(cluster)
    jobs = recorded_jobs(cluster)
    pool = cluster_dir(cluster) / "pool.json"
    if master and pool.exists():
        cancel(jobs["master"], timeout)
        _cancel_pool(cluster, timeout)
        with contextlib.suppress(FileNotFoundError):
            pool.unlink()
    elif workers:
        _cancel_pool(cluster, timeout)
    try:
        if workers:
            cancel(jobs["workers"], timeout)
            jobs["workers"] = []
        if master:
            cancel(jobs["master"], timeout)
            jobs["master"] = []
            with contextlib.suppress(FileNotFoundError):
                (cluster_dir(cluster) / "master.json").unlink()
    finally:
        _record_jobs(cluster, {k: list(active_jobs(v)) if v else [] for k, v in jobs.items()})


@contextlib.contextmanager
def allocate(nworkers: int = _DEFAULTS.workers, *args, **kwargs) -> Iterator[str | None]:
    """Context manager: L{start} on enter (yielding the master's address), L{stop} on exit."""
    kwargs.setdefault("cluster", None)
    address = start(nworkers, *args, **kwargs)
    try:
        yield address
    finally:
        stop(cluster=kwargs["cluster"])


def adapt(cluster: str | None = None, *, secret_file: str | None = None, **start_options) -> None:
    """
    C{cw-slurm adapt}: run the adaptive pools' scaling loops here, in the
    foreground, where compute nodes may not call C{sbatch} (so the master
    job cannot): the master job is submitted if it does not run yet (with
    C{start_options}, which must give C{max_workers} or adaptive C{pools},
    L{PoolSpec}), and this process reads the master's status each second
    (once for all the pools), decides with the same policy
    (L{cw.core.scaling}) and submits, drains and cancels every pool's
    worker jobs itself, with one C{squeue} per polling interval for all
    of them.  On SIGINT or SIGTERM it cancels its worker jobs (they drain)
    and returns; the master job stays (C{cw-slurm stop} ends it).
    """
    cluster = cluster_name(cluster)
    pools = list(start_options.get("pools") or ())
    if start_options.get("max_workers") is None and not pools:
        raise SlurmError("cw-slurm adapt needs --max-workers, or adaptive pools (--pool NAME:min=A,max=B)")
    fixed = [pool.name for pool in pools if not pool.adaptive]
    if fixed:
        raise SlurmError(
            f"cw-slurm adapt runs adaptive pools only (NAME:min=A,max=B), not {', '.join(fixed)}:"
            " start fixed pools with 'cw-slurm start'"
        )
    master = not master_info(cluster)
    start(0, master=master, workers=False, cluster=cluster, secret_file=secret_file, wait=False,
          pool_in_master=False, **start_options)  # fmt: skip
    info = wait_for_master(cluster, start_options.get("timeout", 300))
    spec = read_pool_file(str(cluster_dir(cluster) / "pool.json"))
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    session = Session(
        info["address"], None, lambda r: None, lambda e: None, 60, secret_file=info.get("secret_file")
    )
    reactor = session.reactor

    def status():
        call = lambda: session.call(GetStatus, timeout=30)["status"]  # noqa: E731
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), call)

    services = start_pools(
        spec, StatusSource(status, reactor), launcher_factory(reactor, info["address"]), reactor
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    names = ", ".join(s.name for s in services if s.name)
    print(
        f"cw-slurm adapt: managing the worker jobs{' of the pools ' + names if names else ''} of the master"
        f" at {info['address']}; ^C stops",
        flush=True,
    )

    def start_all():
        for service in services:
            service.start()

    call_in_reactor(start_all)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("cw-slurm adapt: cancelling the pool's worker jobs", flush=True)
        call_in_reactor(lambda: defer.gatherResults([s.stop() for s in services]), timeout=120)
        session.close()


# --- inside the master job ------------------------------------------------


def published_secret(master_options: Sequence[str]) -> str | None:
    """
    The secret file a master started with C{master_options} uses, as
    C{master.json} tells workers and clients (None: C{--insecure}).
    """
    given = parse_argv(MasterConfig, master_options, "cw-master")[0]
    if given.get("insecure"):
        return None
    return str(secret_path(given.get("secret_file"))[0])


def run_master_job(options: Sequence[str]) -> None:
    """
    Run a master (C{cw.master} with C{options}) in this SLURM job; once it
    listens, publish its address: C{master.json} in L{cluster_dir}, and the
    job's comment (for L{master_info}'s C{squeue} fallback).  The file is
    removed when the master stops.
    """
    directory = cluster_dir()
    directory.mkdir(parents=True, exist_ok=True)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    host = socket.gethostname()
    local = directory / f".master-{job_id or os.getpid()}.address"
    with contextlib.suppress(FileNotFoundError):
        local.unlink()
    opts = list(options)
    secret = published_secret(opts)
    final = directory / "master.json"
    published = threading.Event()

    def publish() -> None:
        deadline = time.monotonic() + 600
        while not local.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            listening = local.read_text().strip()
        except OSError:
            return
        port = re.search(r"port=(\d+)", listening) or re.search(r":(\d+)$", listening)
        if port is None:
            print(f"cw.slurm: cannot tell the master's port from {listening!r}", file=sys.stderr)
            return
        info = _info(host, int(port.group(1)), job_id=job_id, cluster=cluster_name(), secret_file=secret)
        info["node"] = os.environ.get("SLURMD_NODENAME", host)
        _write_json(final, info)
        published.set()
        print(f"cw.slurm: master job {job_id} listens at {info['address']}; wrote {final}", flush=True)
        if job_id and shutil.which("scontrol"):
            with contextlib.suppress(SlurmError):
                run_slurm(["scontrol", "update", f"JobId={job_id}", f"Comment={_COMMENT}{info['address']}"])

    state = parse_argv(MasterConfig, opts, "cw-master")[0].get("state")
    if state:
        opts = take_over(state, opts, directory, host)
        signal.signal(signal.SIGUSR2, lambda signum, frame: _replace_soon(directory, job_id))
    threading.Thread(target=publish, name="cw-slurm-publish", daemon=True).start()
    try:
        run_twistd("cw-master", ["--address-file", str(local), *opts])
    finally:
        with contextlib.suppress(FileNotFoundError):
            local.unlink()
        if published.is_set() and (_read_json(final) or {}).get("job_id") == job_id:
            with contextlib.suppress(FileNotFoundError):
                final.unlink()


_replacing = threading.Lock()


def _replace_soon(directory: Path, job_id: str) -> None:
    """SIGUSR2 (the master job's time limit nears): submit the replacement, once, off the signal handler."""
    if _replacing.acquire(blocking=False):
        threading.Thread(target=replace_master, args=(directory, job_id), name="cw-slurm-replace").start()


def replace_master(directory: Path, job_id: str) -> str | None:
    """
    Submit a replacement of master job C{job_id} (the script L{start}
    kept in C{directory}) and record it; return its id (None if that
    failed, which is printed).
    """
    try:
        script = (directory / MASTER_SCRIPT).read_text()
        new = submit(script, directory)
    except (OSError, SlurmError) as e:
        print(
            f"cw.slurm: cannot submit a replacement for master job {job_id}: {e}", file=sys.stderr, flush=True
        )
        return None
    jobs = recorded_jobs()
    jobs["master"] = [*[i for i in jobs["master"] if i != new], new]
    _record_jobs(cluster_name(), jobs)
    print(
        f"cw.slurm: master job {job_id} nears its time limit; submitted replacement master job {new},"
        " which takes over the state file once it runs",
        flush=True,
    )
    return new


def take_over(state: str, options: list[str], directory: Path, host: str) -> list[str]:
    """
    Before a master starts on the state file C{state}: if another master
    holds it (the master job this one replaces), ask that one to hand over
    (C{SIGTERM} to its job's batch step) and wait, up to L{HANDOVER_WAIT}
    seconds, until it has let go.  On the old master's node, listen on its
    port (unless C{options} name one): return the options to run with.
    """
    old = _read_json(directory / "master.json") or {}
    if not locked(state):
        return options
    old_job = str(old.get("job_id") or "")
    print(
        f"cw.slurm: the state file {state} is held by master job {old_job or '?'}; asking it to hand over",
        flush=True,
    )
    if old_job:
        with contextlib.suppress(SlurmError):
            run_slurm(["scancel", "--batch", "--signal=TERM", old_job])
    deadline = time.monotonic() + HANDOVER_WAIT
    for _ in polling(0.05, 1.0):
        if not locked(state):
            break
        if time.monotonic() > deadline:
            raise SlurmError(
                f"the master holding the state file {state} (job {old_job or '?'}) did not hand over"
                f" within {HANDOVER_WAIT} s; cancel it, and this master job takes over"
            )
    print(f"cw.slurm: master job {old_job or '?'} handed over the state file", flush=True)
    port = old.get("port")
    given = parse_argv(MasterConfig, options, "cw-master")[0]
    if port and old.get("host") == host and given.get("port") in (None, "tcp:0"):
        options = [*options, "--port", f"tcp:{port}"]
    return options


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m cw.slurm master-job -- OPTIONS}: the master job's command.
    C{python -m cw.slurm wait-master [--timeout S]}: wait for the master,
    print its C{HOST:PORT}.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else ""
    if command == "master-job":
        if args[:1] == ["--"]:
            args = args[1:]
        run_master_job(args)
        return 0
    if command == "wait-master":
        timeout = float(args[args.index("--timeout") + 1]) if "--timeout" in args else MASTER_WAIT
        try:
            info = wait_for_master(timeout=timeout, report=lambda m: print(m, file=sys.stderr))
        except SlurmError as e:
            print(f"cw.slurm: {e}", file=sys.stderr)
            return 1
        print(info["address"])
        return 0
    print(
        "usage: python -m cw.slurm master-job -- [MASTER OPTIONS] | wait-master [--timeout S]",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
