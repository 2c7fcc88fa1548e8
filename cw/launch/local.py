"""
A local cluster: a master and workers as child processes of this machine.

C{start} launches them, each in its own session so that a terminal's ^C
does not kill them halfway, and returns once the master accepts connections
and every worker has registered.  Their PIDs go into pidfiles under a run
directory; C{stop} signals exactly those PIDs (checking that each PID still
belongs to the process that was started) and their process groups.

Layer rule (cw.launch): imports cw.client, cw.master, cw.worker and below; never cw.cli.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cw.client.session import Session, wait_for_workers
from cw.core.config import MasterConfig, WorkerConfig, parse_argv
from cw.core.records import PORT
from cw.core.scaling import DRAIN_LEAD, IDLE_TIMEOUT, REPLACE_LEAD, PoolBounds
from cw.errors import ClusterError
from cw.system import polling, proc_stat, read_pidfile, sigkill, write_pidfile
from cw.wire.commands import GetStatus

#: Processes started by this Python process, by PID, so they can be reaped.
_children: dict[int, subprocess.Popen] = {}


def run_dir(port: int = PORT) -> Path:
    """Where pidfiles, logs and the master's address live for C{port}."""
    base = os.environ.get("CW_RUN_DIR")
    if base:
        return Path(base) / f"local-{port}"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "cw" / f"local-{port}"


def _alive(pid: int) -> bool:
    popen = _children.get(pid)
    if popen is not None:
        return popen.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat(pid)
    return fields is None or fields[0] != "Z"


def _spawn(args: list[str], log: Path, pidfile: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[popen.pid] = popen
    write_pidfile(pidfile, popen.pid)
    return popen


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for_file(path: Path, popen: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    for _ in polling(0.01, 0.2):
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        if popen.poll() is not None:
            raise ClusterError(
                f"the cw master exited with code {popen.returncode} before listening;"
                f" its log ({log}) ends:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(f"the cw master did not listen within {timeout} s; see {log}")


def start(
    nworkers: int = 1,
    master: bool = True,
    workers: bool = True,
    master_options: list[str] = [],
    worker_options: list[str] = [],
    docker_image: str | None = None,
    docker_args: str = "",
    *,
    port: int = PORT,
    procs: int = 1,
    timeout: float = 60,
    min_workers: int | None = None,
    max_workers: int | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    time_limit: float | None = None,
) -> str:
    """
    Start a master listening on C{port} (loopback only) and C{nworkers}
    workers with C{procs} job slots each; return the master's address once
    all workers have registered.  Raises L{ClusterError} if a cluster
    already runs on this port or a process fails to come up (its processes
    are stopped again).

    With C{max_workers}, the master runs an adaptive pool instead
    (C{nworkers} is ignored): it starts workers (C{procs} slots each) as
    jobs queue up, between C{min_workers} (default 0) and C{max_workers},
    and stops those idle for C{idle_timeout} seconds (see
    L{cw.core.scaling}); this returns once the master listens.
    C{time_limit} gives each worker a walltime in seconds, as a batch
    system would (the pool replaces workers ahead of it).
    """
    if docker_image:
        raise ClusterError("docker_image is only supported for SLURM clusters")
    adaptive = max_workers is not None
    directory = run_dir(port)
    # Private: its logs hold what jobs print.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    address_file = directory / "master.address"
    try:
        if master:
            existing = read_pidfile(directory / "master.pid")
            if existing is not None:
                raise ClusterError(
                    f"a local cw master already runs on port {port} (pid {existing});"
                    " call cw.stop() first, or start on another port"
                )
            with contextlib.suppress(FileNotFoundError):
                address_file.unlink()
            log = directory / "master.log"
            options = list(master_options)
            if "port" not in parse_argv(MasterConfig, options, "cw-master")[0]:
                options += ["--port", f"tcp:{port}:interface=127.0.0.1"]
            if adaptive:
                pool = _pool_file(directory, min_workers or 0, max_workers, idle_timeout, time_limit)
                pool["worker_args"] = _worker_args(worker_options, procs)
                pool_file = directory / "pool.json"
                pool_file.write_text(json.dumps(pool, indent=2) + "\n")
                options += ["--pool-file", str(pool_file)]
            popen = _spawn(
                ["-m", "cw.master", "--address-file", str(address_file), *options],
                log,
                directory / "master.pid",
            )
            address = _wait_for_file(address_file, popen, log, timeout)
        else:
            address = f"localhost:{port}"
        if workers and nworkers > 0 and not adaptive:
            _start_workers(directory, address, nworkers, procs, worker_options, timeout)
    except BaseException:
        stop(master=master, workers=workers, port=port)
        raise
    return address


def _worker_args(options: list[str], procs: int) -> list[str]:
    """A worker's options: C{options}, with C{--procs procs} unless they give it."""
    if "procs" in parse_argv(WorkerConfig, options, "cw-worker")[0]:
        return list(options)
    return [*options, "--procs", str(procs)]


def _pool_file(
    directory: Path, min_workers: int, max_workers: int, idle_timeout: float, time_limit: float | None
) -> dict:
    """The adaptive pool's description for the master (L{cw.master.pool.read_pool_file})."""
    try:
        PoolBounds(min_workers=min_workers, max_workers=max_workers, idle_timeout=idle_timeout)
    except ValueError as e:
        raise ClusterError(f"cw.mp.start: {e}") from None
    pool = {
        "launcher": "local",
        "min_workers": min_workers,
        "max_workers": max_workers,
        "idle_timeout": idle_timeout,
        "run_dir": str(directory),
        "time_limit": time_limit,
    }
    if time_limit is not None:
        # Short walltimes (tests): replace a third of the way before the end, drain at a sixth.
        pool["replace_lead"] = min(REPLACE_LEAD, time_limit / 3)
        pool["drain_lead"] = min(DRAIN_LEAD, time_limit / 6)
    return pool


def _start_workers(
    directory: Path, address: str, n: int, procs: int, options: list[str], timeout: float
) -> None:
    session = Session(address, None, lambda r: None, lambda e: None, connect_timeout=timeout)
    try:
        before = len(session.call(GetStatus)["status"]["workers"])
    finally:
        session.close()
    first = 0
    while (directory / f"worker-{first}.pid").exists():
        first += 1
    popens = []
    for i in range(first, first + n):
        args = ["-m", "cw.worker", "--master", address, *_worker_args(options, procs)]
        log = directory / f"worker-{i}.log"
        popens.append((_spawn(args, log, directory / f"worker-{i}.pid"), log))
    deadline = time.monotonic() + timeout
    while True:
        for p, log in popens:
            if p.poll() is not None:
                raise ClusterError(
                    f"a cw worker exited with code {p.returncode}; its log ({log}) ends:\n{_tail(log)}"
                )
        try:
            # Short rounds, so that a worker dying at start is reported at once.
            wait_for_workers(before + n, address, None, timeout=1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise ClusterError(f"cw workers did not register within {timeout} s") from None


def _stop_pids(pids: list[int], timeout: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for _ in polling(0.01, 0.2):
        if not any(_alive(pid) for pid in pids) or time.monotonic() >= deadline:
            break
    for pid in pids:
        # Each process leads its own group; a worker's job processes lead
        # groups of their own and die with it (cw.worker.containment).
        sigkill(pid, group=True)
        popen = _children.pop(pid, None)
        if popen is not None:
            popen.wait()


def stop(master: bool = True, workers: bool = True, *, port: int = PORT, timeout: float = 40) -> None:
    """
    Stop the local cluster on C{port}: workers first (each finishes its
    shutdown within C{timeout} seconds or is killed; the default leaves room
    for a worker's 30-second drain of running jobs), then the master.  An
    adaptive pool's master goes first: it stops its own workers.
    """
    directory = run_dir(port)
    pool = directory / "pool.json"
    if master and pool.exists():
        # An adaptive pool's master would start workers again: it goes
        # first, and stops its workers itself.
        _stop_master(directory, timeout)
        with contextlib.suppress(FileNotFoundError):
            pool.unlink()
    if workers:
        files = sorted(directory.glob("worker-*.pid"))
        _stop_pids([pid for pid in map(read_pidfile, files) if pid is not None], timeout)
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    if master:
        _stop_master(directory, timeout)


def _stop_master(directory: Path, timeout: float) -> None:
    f = directory / "master.pid"
    pid = read_pidfile(f)
    if pid is not None:
        _stop_pids([pid], timeout)
    with contextlib.suppress(FileNotFoundError):
        f.unlink()


@contextlib.contextmanager
def allocate(nworkers: int = 1, *args, **kwargs):
    """Context manager: L{start} on enter (yielding the master's address), L{stop} on exit."""
    address = start(nworkers, *args, **kwargs)
    try:
        yield address
    finally:
        stop(**{k: kwargs[k] for k in ("port",) if k in kwargs})
