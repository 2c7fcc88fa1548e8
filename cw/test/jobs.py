"""
Functions that tests run as jobs.  They live in a module of their own so
that every test file shares one copy, and so that workers import them by
name (cloudpickle pickles module-level functions by reference).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def square(x):
    return x * x


def touch(path):
    """Create C{path} (empty); return it."""
    with open(path, "w"):
        pass
    return path


def block_until(flag, started=None, timeout=120):
    """
    Record this job process's pid in C{started} (if given), then wait until
    C{flag} exists; return C{"released"}.  Lets a test hold a slot busy for
    exactly as long as it wants, without guessing durations.
    """
    if started:
        with open(started, "w") as f:
            f.write(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise TimeoutError(flag)
        time.sleep(0.01)
    return "released"


def wait_for_file(path, timeout=60):
    """Wait (in a job) until C{path} exists; return the worker's pid."""
    block_until(path, timeout=timeout)
    return os.getppid()


def worker_pid(_=None):
    """Which worker ran this job: the job process's parent is the worker."""
    return os.getppid()


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def exit_with(code):
    os._exit(code)


def sys_exit(code):
    sys.exit(code)


def payload_bytes(size, seed):
    """C{size} pseudo-random bytes, the same for the same C{seed} everywhere."""
    import random

    rng = random.Random(seed)
    block = 1 << 20
    return b"".join(rng.randbytes(min(block, size - start)) for start in range(0, size, block))


def digest(data):
    """The length and SHA-256 (hex) of C{data}: a short answer about a big argument."""
    import hashlib

    return len(data), hashlib.sha256(data).hexdigest()


def tagged_square(i):
    """C{(i, i * i)}: a result that names the job it belongs to."""
    return i, i * i


def child_counters(_=None):
    """C{(pid, functions unpickled, jobs run)} of the job process running this job."""
    import os

    from cw.worker import child as child

    return os.getpid(), child.stats["functions_unpickled"], child.stats["jobs"]


def start_sleeps(record, then="return"):
    """
    Start processes that outlive this job unless cw kills them, and record
    their pids in C{record} as JSON: C{"job"} (this job process),
    C{"group"} (a C{sleep 300} and a forked copy of this process, both in
    its process group) and C{"outside"} (a C{sleep 300} in a session of its
    own and a daemonized one, its parent gone).  Then C{"return"} (the
    recorded pids), C{"hang"} or C{"die"} (SIGKILL this job process).  All
    but the daemon hold this process's stdout and stderr open.
    """
    import json
    import subprocess

    forked = os.fork()
    if forked == 0:
        time.sleep(300)
        os._exit(0)
    with subprocess.Popen(
        ["sh", "-c", "sleep 300 >/dev/null & echo $!"], stdout=subprocess.PIPE, start_new_session=True
    ) as daemonize:
        daemon = int(daemonize.stdout.readline())
    pids = {
        "job": os.getpid(),
        "group": [subprocess.Popen(["sleep", "300"]).pid, forked],
        "outside": [subprocess.Popen(["sleep", "300"], start_new_session=True).pid, daemon],
    }
    with open(record + ".tmp", "w") as f:
        json.dump(pids, f)
    os.replace(record + ".tmp", record)
    if then == "hang":
        time.sleep(300)
    elif then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return pids


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def wait_then(path, value=None, timeout=60):
    """Wait until C{path} exists (if given; a cross-process event); return C{value}."""
    if path:
        block_until(path, timeout=timeout)
    return value


def wait_and_raise(path, timeout=60):
    block_until(path, timeout=timeout)
    raise Exception("this is an exception")


def sleep_and_return(seconds, value):
    time.sleep(seconds)
    return value


class MyObject:
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


class NeedsTwo(Exception):
    """An exception whose constructor needs two arguments (its C{args} hold one)."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a = a
        self.b = b


def raise_needs_two(a, b):
    raise NeedsTwo(a, b)


class NoSubclasses(Exception):
    """An exception class that refuses to be subclassed."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError("NoSubclasses cannot be subclassed")


def raise_no_subclasses():
    raise NoSubclasses("final")


def raise_from_private_module(directory):
    """
    Raise an exception whose class lives in a module that only this job
    process can import (written to C{directory}, which only it puts on
    C{sys.path}): the client cannot unpickle it.
    """
    name = f"cw_private_{os.getpid()}_{time.monotonic_ns()}"
    with open(os.path.join(directory, name + ".py"), "w") as f:
        f.write("class PrivateError(Exception):\n    pass\n")
    sys.path.insert(0, directory)
    try:
        module = __import__(name)
    finally:
        sys.path.remove(directory)
    raise module.PrivateError("only the worker knows this class")


def append_line(path, line):
    """Append C{line} to C{path} (jobs on one slot record the order they ran in)."""
    with open(path, "a") as f:
        f.write(f"{line}\n")
    return line


def allocate(mib):
    """Allocate C{mib} MiB (a MemoryError past the worker's --memory-limit); return the bytes."""
    return len(bytearray(mib << 20))


def probe(seconds=0.0):
    """
    What a job sees of its resources: the worker and process that ran it,
    the devices and thread counts in its environment (and C{CW_TEST_ENV}),
    its affinity, and when it ran.
    """
    start = time.time()
    time.sleep(seconds)
    return {
        "worker": os.getppid(),
        "pid": os.getpid(),
        "env": os.environ.get("CW_TEST_ENV"),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "rocr": os.environ.get("ROCR_VISIBLE_DEVICES"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "mkl": os.environ.get("MKL_NUM_THREADS"),
        "openblas": os.environ.get("OPENBLAS_NUM_THREADS"),
        "affinity": sorted(os.sched_getaffinity(0)),
        "slurm_cpus": os.environ.get("SLURM_CPUS_PER_TASK"),
        "start": start,
        "end": time.time(),
    }


def nap_square(x, seconds=0.005):
    """Sleep C{seconds} (a small job of known length), then return C{x * x}."""
    time.sleep(seconds)
    return x * x


def count_run_then_wait(marker_dir, flag, name="job"):
    """
    Record one run of this job (a new file in C{marker_dir}, named by its
    pid), wait until C{flag} exists, and return C{name}: a long job whose
    runs a test can count.
    """
    with open(os.path.join(marker_dir, f"{name}-run-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    block_until(flag)
    return name


def timed_digest(data, record=None):
    """
    C{(start, length, SHA-256 hex)} of C{data}, C{start} the
    C{time.monotonic()} at which the job began (after its argument arrived
    and was unpickled: comparable with the client's clock on one machine);
    appends a line to C{record}, if given, so that a test can count runs.
    """
    import hashlib
    import time

    start = time.monotonic()
    if record is not None:
        with open(record, "a") as f:
            f.write("ran\n")
    return start, len(data), hashlib.sha256(data).hexdigest()
