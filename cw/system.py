"""
Operating-system helpers shared by the layers above: atomic file writes,
reading C{/proc/PID/stat} (process states, parents and start times),
pidfiles that tell a process from a later one reusing its PID,
SIGKILL that ignores processes already gone, polling with exponential
back-off, and putting this cw on a child's C{PYTHONPATH}.

Layer rule: imports nothing of cw (it sits between cw.wire and cw.core, see
C{pyproject.toml}); no Twisted, no sockets: job processes import it.  The pure core must not import
it (it does I/O).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

#: The directory holding the C{cw} package (this file is cw/system.py), so
#: that child processes import this very code.
CW_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_atomically(path: str | os.PathLike, text: str, tmp_suffix: str = "") -> None:
    """
    Write C{text} to C{path} through a temporary file in the same directory
    and C{os.replace}, so that readers see the old file or the new one, never
    half of one.  C{tmp_suffix} goes into the temporary name besides the PID
    (a host name, where several machines share the directory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tmp_suffix}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def proc_stat(pid: int | str) -> list[str] | None:
    """
    The fields of C{/proc/PID/stat} after the command name (Linux): C{[0]}
    is the state (C{Z} for a zombie), C{[1]} the parent's PID, C{[19]} the
    start time.  None if the process is gone (or this is not Linux).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (in parentheses) may hold spaces and ")".
            return f.read().rsplit(b")", 1)[1].decode("ascii", "replace").split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """The kernel's start time of C{pid} (Linux), to tell a reused PID apart; None if unknown."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def write_pidfile(path: str | os.PathLike, pid: int) -> None:
    """
    Record C{pid} in the pidfile C{path} as C{PID START}, START being the
    kernel's start time of the process (C{-} if unknown), so that
    L{read_pidfile} can tell the process started from a later one that
    reuses its PID.
    """
    Path(path).write_text(f"{pid} {start_time(pid) or '-'}\n")


def read_pidfile(path: str | os.PathLike) -> int | None:
    """
    The PID in the pidfile C{path} (as L{write_pidfile} writes it) if that
    process still runs and is the one started: not a zombie, and the same
    start time where both are known.  None if the file is missing or
    garbled, the process is gone, or its PID now belongs to another one.
    """
    try:
        pid_text, start = Path(path).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    fields = proc_stat(pid)
    if fields is not None and fields[0] == "Z":
        return None
    if start != "-" and start_time(pid) not in (None, start):
        return None
    return pid


def sigkill(pid: int, group: bool = False) -> None:
    """SIGKILL process C{pid} (or, if C{group}, process group C{pid}); ignore it being gone or not ours."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def polling(first: float, most: float, factor: float = 2.0) -> Iterator[int]:
    """
    The rounds of a blocking polling loop: yields 0, 1, 2, ... and sleeps
    between rounds, C{first} seconds at first, then C{factor} times longer
    each round up to C{most}.  The loop's body checks its condition and
    deadline and leaves the loop.  (For blocking code without a reactor;
    reactor code uses Twisted's C{backoffPolicy}.)
    """
    delay = first
    for attempt in itertools.count():
        yield attempt
        time.sleep(delay)
        delay = min(delay * factor, most)


def with_cw_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """
    A copy of C{env} with L{CW_ROOT} first on C{PYTHONPATH} (each entry once),
    so that a child process imports the same cw as this one.
    """
    env = dict(env)
    paths = [CW_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


#: The status L{exit_with_status} asked for (None: leave the exit status alone).
_exit_status: int | None = None


def exit_with_status(status: int) -> None:
    """
    Make this process exit with C{status} once it has finished normally:
    twistd returns 0 whenever its reactor stops, so a service that could not
    start (a port in use) would otherwise look like a clean exit.  The exit
    comes after twistd has removed its pidfile and flushed its log, and after
    every exit handler registered since cw.system was imported.
    """
    global _exit_status
    _exit_status = status


@atexit.register
def _exit_if_asked() -> None:
    if _exit_status is not None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_exit_status)


# -- what this machine (or SLURM allocation) gives a worker -------------------


def affinity_cores() -> list[int]:
    """The cores this process may run on (its CPU affinity), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def detect_cpus(env: Mapping[str, str], cores: list[int]) -> int:
    """
    Cores a worker has: under SLURM, its task's C{SLURM_CPUS_PER_TASK}
    (the allocation, whatever the affinity says where SLURM does not bind
    tasks); else those in C{cores} (its affinity), no more than
    C{SLURM_CPUS_ON_NODE} if set.
    """
    count = len(cores) or 1
    per_task = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task)
    on_node = env.get("SLURM_CPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return min(count, int(on_node))
    return count


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit(
    proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """
    This process's cgroup memory limit in bytes (cgroup v2 C{memory.max},
    or v1 C{memory.limit_in_bytes}), or None when there is none.
    """
    text = _read(proc) or ""
    limits = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":
            candidates = [root / path / "memory.max", root / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [
                root / "memory" / path / "memory.limit_in_bytes",
                root / "memory" / "memory.limit_in_bytes",
            ]
        else:
            continue
        for candidate in candidates:
            value = _read(candidate)
            if value is not None:
                if value.isdigit() and int(value) < 1 << 60:
                    limits.append(int(value))
                break
    return min(limits) if limits else None


def physical_memory() -> int:
    """Bytes of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_memory(env: Mapping[str, str], cgroup: int | None, physical: int) -> int:
    """
    Memory a worker has: the cgroup limit if there is one, else physical
    memory, and under SLURM no more than C{SLURM_MEM_PER_NODE} (MiB).
    """
    memory = cgroup if cgroup else physical
    value = env.get("SLURM_MEM_PER_NODE", "").strip()
    if value.isdigit() and int(value) > 0:
        memory = min(memory, int(value) << 20) if memory else int(value) << 20
    return memory


def detect_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    """
    The ids of the GPUs a worker was given: C{CUDA_VISIBLE_DEVICES} if set
    (C{NoDevFiles} or an empty value: none), else SLURM's
    C{SLURM_STEP_GPUS}, else C{SLURM_JOB_GPUS}; none without any.
    """
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if name in env:
            value = env[name].strip()
            if value in ("", "NoDevFiles") or value.startswith("-1"):
                return ()
            return tuple(part.strip() for part in value.split(",") if part.strip())
    return ()


def machine_identity() -> str | None:
    """
    What two processes share when each can open the other's memory files
    through C{/proc/PID/fd/N}: the same running kernel (its boot id), the
    same PID namespace (so a PID names the same process for both) and the
    same user.  Two processes with equal identities are on one machine
    and can pass big payloads through shared memory instead of sockets;
    C{None} where there is no C{/proc} (no such shortcut).

    C{CW_MACHINE_IDENTITY} in the environment replaces it: C{none} turns
    the shortcut off for this process; any other value stands for the
    identity (tests use it to play a process on another machine).
    """
    forced = os.environ.get("CW_MACHINE_IDENTITY")
    if forced:
        return None if forced.lower() == "none" else forced
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}:{namespace}:{os.getuid()}"
