"""
Keeping what a job starts inside its job process's reach.

A job process (L{cw.worker.child.JobChild}) calls L{contain_job_process} before
anything else.  It then:

  - leads a session of its own, so that its process group holds it and
    every process its jobs start (unless one of those leaves the group
    itself, with C{setsid} or C{setpgid});
  - dies with its worker: C{PR_SET_PDEATHSIG(SIGKILL)} (Linux), and exits
    at once if the worker is already gone.  The signal comes when the
    I{thread} that started the process ends: workers start job processes
    from the reactor's thread, which lives as long as the worker;
  - has a guard (L{start_guard}): a tiny shell in its group, outside its
    descendants, that kills the group as soon as the job process is gone,
    however it went (so a job's subprocesses do not outlive a worker killed
    with SIGKILL either);
  - adopts its orphaned descendants (C{PR_SET_CHILD_SUBREAPER}, Linux), so
    that a process a job leaves behind, even one that left the group, stays
    among its descendants while the job process lives;
  - survives SIGTERM (a handler that does nothing; its reactor installs
    none, see L{cw.wire.private.job_bootstrap}): SLURM's walltime warning
    and C{scancel --signal=TERM} reach every process of a job step, and
    the job running must finish while its worker drains.  The worker kills
    job processes with SIGKILL; the job's own subprocesses get the default
    SIGTERM (a handler does not survive C{exec}).

After each job, L{kill_leftovers} kills whatever the job left running.  On
the worker's side, L{kill_job_process} kills a job process with its
descendants and its group (timeouts, cancels, draining), and
L{kill_group} kills what is left of a group once its leader has exited (a
crash, a recycle).  L{release_pipes} stops the worker waiting on pipes that
a surviving process may still hold open.

What is not promised: a descendant that leaves the job's process group
(C{setsid}, C{setpgid}) and whose job process dies without being killed by
its worker (a crash, or a worker killed with SIGKILL) is reparented to init
and keeps running.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

from cw.system import proc_stat, sigkill

#: C{prctl} options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

#: Longest time, in seconds, L{kill_leftovers} waits for killed processes
#: to be reaped.
REAP_WAIT = 2.0

#: Set by L{contain_job_process}: this process is a job process, whose
#: children are all a job's.
_contained = False


def _prctl(option: int, value: int) -> bool:
    """Call Linux's C{prctl(option, value)}; False where it is unavailable or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def contain_job_process(worker_pid: int) -> None:
    """
    Make this process (a new job process of worker C{worker_pid}) a session
    leader that dies with its worker and adopts its orphans.  Called first
    thing in the job process, before it reads any job.
    """
    global _contained
    _contained = True
    with contextlib.suppress(OSError):  # already a group leader
        os.setsid()
    start_guard()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, _survive_sigterm)
    # PDEATHSIG only covers a parent that dies from now on.
    if os.getppid() != worker_pid:
        os._exit(1)


def _survive_sigterm(signum, frame) -> None:
    """A job process's SIGTERM handler: the job goes on (see the module docstring)."""


def start_guard() -> None:
    """
    Start this process's guard: a shell in its process group, orphaned at
    once (so it is not among this process's children, which
    L{kill_leftovers} kills), waiting for EOF on a pipe that only this
    process holds open; when this process is gone, however it went, the
    guard kills the group, itself included.  Called by
    L{contain_job_process} before this process becomes a subreaper.
    """
    if os.getpgrp() != os.getpid():
        return  # not a group leader: the group is not this process's own
    read_end, write_end = os.pipe()  # not inherited by what jobs start
    try:
        subprocess.run(
            ["/bin/sh", "-c", f"(read _ <&{read_end}; kill -9 -{os.getpgrp()}) &"],
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        os.close(write_end)  # no guard; the rest of the containment holds
    else:
        # Kept open for this process's life; closed in a forked child, so
        # that only this process's end makes the guard act.
        os.register_at_fork(after_in_child=functools.partial(os.close, write_end))
    finally:
        os.close(read_end)


def descendants(pid: int) -> list[int]:
    """The pids of every descendant of C{pid}, parents before children (from /proc)."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = proc_stat(entry)
        try:
            ppid = int(fields[1])  # type: ignore[index]
        except (TypeError, IndexError, ValueError):
            continue
        children[ppid].append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in process group C{pgid}, if any."""
    sigkill(pgid, group=True)


def kill_job_process(pid: int) -> None:
    """
    SIGKILL the live (not yet reaped) job process C{pid}, its descendants
    (those that left its group included: it adopted them) and its group.
    The descendants go first: once the job process is dead its orphans are
    out of reach.
    """
    for child in descendants(pid):
        sigkill(child)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        # Not yet a group leader (it had just started): the process alone.
        sigkill(pid)
    except PermissionError:
        pass


def _has_children() -> bool:
    """Whether this process has any child process (running or not yet reaped)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def kill_leftovers(wait: float = REAP_WAIT) -> int:
    """
    Kill every process that a job just run in this job process left
    running, and reap them; return how many were found.  Costs one system
    call when the job left nothing.  Does nothing outside a job process
    (see L{contain_job_process}), such as a test calling a job's code.
    """
    if not _contained or not _has_children():
        return 0
    me = os.getpid()
    seen: set[int] = set()
    deadline = time.monotonic() + wait
    while True:
        found = descendants(me)
        seen.update(found)
        for pid in found:
            sigkill(pid)
        # Reap what died (this process adopts the orphans of those it kills).
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return len(seen)
            if pid == 0:
                break
        if time.monotonic() > deadline:
            return len(seen)
        time.sleep(0.001)


def release_pipes(process) -> None:
    """
    Stop waiting on the pipes of C{process} (a Twisted process transport
    whose process has exited): read what its pipes already hold, then close
    them.  A process outside the job's reach that inherited them would
    otherwise hold back the worker's view of the job's end.

    Twisted's C{Process.pipes} and its pipe classes are internal: this is
    the one place cw relies on them.
    """
    # Imported here, not at the top: a job process imports this module first
    # thing, before Twisted (contain_job_process), and must stay quick to contain.
    from twisted.internet import error
    from twisted.python.failure import Failure

    from cw.wire.private import ProcessReader

    for fd, pipe in list(getattr(process, "pipes", {}).items()):
        if isinstance(pipe, ProcessReader):
            while not (pipe.disconnecting or pipe.disconnected):
                try:
                    data = os.read(pipe.fileno(), 1 << 16)
                except OSError:
                    break
                if not data:
                    break
                pipe.dataReceived(data)
        # What was just received may have closed it already.
        if process.pipes.get(fd) is pipe and not (pipe.disconnecting or pipe.disconnected):
            pipe.connectionLost(Failure(error.ConnectionDone()))
