"""
Helpers for tests that run real cw processes.

Every process is started in its own session, tracked by its
L{subprocess.Popen} object, and stopped by PID in the test's cleanup,
whether the test passed or not (a worker's job processes die with it).  Every wait
has a deadline.  The helpers block, so tests call them from a thread
(C{deferToThread}) while trial's reactor runs in the main thread.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import threads

import cw
from cw.system import polling, proc_stat, read_pidfile, sigkill, with_cw_on_path
from cw.wire import memfile

#: The directory that holds the C{cw} package under test (and, next to it,
#: C{twisted/plugins}); put first on the children's PYTHONPATH so that they
#: run this very code.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cw.__file__)))

#: How to run the real twistd script of this Python environment.
_script = os.path.join(os.path.dirname(sys.executable), "twistd")
TWISTD = (
    [sys.executable, _script]
    if os.path.exists(_script)
    else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
)

#: Upper bound for any single wait in these helpers, in seconds.
DEADLINE = 60


def child_env(**extra: str) -> dict[str, str]:
    env = with_cw_on_path(os.environ)
    env["CW_BACKEND"] = "local"
    env.update(extra)
    return env


def arguments_travel(testcase) -> None:
    """
    Make this process's clients, for the rest of C{testcase}, send their
    jobs' arguments through the sockets rather than leave big ones in
    their memory (L{cw.client.arguments}): for tests of the paths the
    bytes take (it plays a client with no known machine).
    """
    play_machine(testcase, "none")


def on_another_machine(testcase) -> None:
    """
    Make this process's clients, for the rest of C{testcase}, say they run
    on another machine than the workers already started: their big
    arguments stay in their memory until the master asks for them for a
    worker (L{cw.wire.commands.FetchPayload}), and go on to it through the
    master.
    """
    play_machine(testcase, "another-machine")


def play_machine(testcase, identity: str) -> None:
    """
    Make this process's clients, for the rest of C{testcase}, take
    C{identity} for their machine's (C{CW_MACHINE_IDENTITY}, see
    L{cw.system}; C{"none"}: no known machine).
    """
    old = os.environ.get("CW_MACHINE_IDENTITY")
    os.environ["CW_MACHINE_IDENTITY"] = identity
    testcase.addCleanup(
        lambda: (
            os.environ.pop("CW_MACHINE_IDENTITY")
            if old is None
            else os.environ.update(CW_MACHINE_IDENTITY=old)
        )
    )


def each_path(testcase):
    """
    For a test of what must not depend on the path big payloads take
    between a client and the workers on its machine: yield C{"memory"},
    then C{"sockets"}.  Clients made during the first pass are on the
    workers' machine (their big arguments stay in their memory, big
    results are lent from the workers' memory); during the second, they
    play a client with no known machine (L{arguments_travel}), so every
    byte crosses the sockets and the master.  Make a new client in each
    pass and check it with L{check_path}.
    """
    yield "memory"
    arguments_travel(testcase)
    yield "sockets"


def check_path(testcase, client, path: str) -> None:
    """
    Fail unless C{client} (an executor or a client thread) sends big
    arguments by the C{path} of L{each_path}: so that a shortcut that
    silently stopped working cannot pass as its pass.
    """
    testcase.assertEqual(
        client.session.references, path == "memory", f"the client does not take the {path} path"
    )


def in_thread(method):
    """Run a test method in a thread (the blocking client API), trial's reactor spinning."""

    def run(self):
        return threads.deferToThread(method, self)

    run.__name__ = method.__name__
    run.__doc__ = method.__doc__
    return run


# -- cw's memory files (cw.wire.memfile) --------------------------------------


def memory_files(pid_: int | str = "self") -> int:
    """How many descriptors of process C{pid_} are cw's memory files."""
    count = 0
    for fd in os.listdir(f"/proc/{pid_}/fd"):
        try:
            if os.readlink(f"/proc/{pid_}/fd/{fd}").startswith(f"/memfd:{memfile.NAME}"):
                count += 1
        except OSError:
            pass  # closed meanwhile
    return count


def mapped_memory_files(pid: int) -> int:
    """How many mappings of cw's memory files process C{pid} has."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(f"memfd:{memfile.NAME}" in line for line in f)


def dev_shm() -> set[str]:
    """
    The files in /dev/shm that shared payloads could leave: cw's own names
    and C{multiprocessing.shared_memory}'s (others, such as joblib's, are
    left by other tests running on the machine).  cw's memory files have
    no name there at all: this guards against a change that gives them one.
    """
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if "cw" in name or name.startswith("psm_")}


def can_mount() -> bool:
    """Whether this process may mount a file system in a mount namespace of its own (root, unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def almost_full_tmpdir(directory: str) -> tuple[str, ...]:
    """
    A command prefix that runs the rest in a mount namespace of its own,
    with a 64 KiB file system on C{directory} filled but for 8 KiB (so
    that a probe of it, such as C{tempfile}'s, still finds it usable).
    The mount ends with the namespace's processes.
    """
    script = 'mount -t tmpfs -o size=64k tmpfs "$0" && head -c 57344 /dev/zero > "$0/fill" && exec "$@"'
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", script, directory)


def free_port() -> int:
    """A TCP port that was free a moment ago (for APIs that need a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on C{host}:C{port} (a master started without waiting)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition"):
    """Poll C{predicate} with backoff until it returns a true value."""
    deadline = time.monotonic() + timeout
    for _ in polling(0.005, 0.1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_process(popen: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then after C{timeout} SIGKILL to the whole process group."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    sigkill(popen.pid, group=True)
    popen.wait(timeout)


def process_exists(pid: int) -> bool:
    """True if C{pid} is a live (not zombie) process."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


def _live_processes():
    """C{(pid, stat fields after the command name)} of every live (not zombie) process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(entry)
        if fields and fields[0] != "Z":
            yield int(entry), fields


def group_members(pgid: int) -> list[int]:
    """Live PIDs whose process group is C{pgid}."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def job_processes(worker_pid: int) -> list[int]:
    """
    Live job processes of the worker C{worker_pid}: its children (each
    leads a process group of its own, see L{cw.worker.containment}).
    """
    return [pid for pid, fields in _live_processes() if int(fields[1]) == worker_pid]


class Processes:
    """
    A master and workers run as real C{twistd} processes for one test.

    @param testcase: cleanups are registered on it.
    @param directory: where logs and the address file go.
    """

    def __init__(self, testcase, directory: str) -> None:
        self.testcase = testcase
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.address: str | None = None
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._count = 0

    def spawn(
        self, name: str, args: list[str], prefix: tuple[str, ...] = (), env: dict | None = None
    ) -> subprocess.Popen:
        """
        Run C{twistd ARGS}, behind C{prefix} if given (a command that execs
        the rest in place, such as C{ip netns exec NS}, so the pid stays),
        with C{env} added to its environment.
        """
        log = self.directory / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [*prefix, *TWISTD, "--nodaemon", "--pidfile=", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(**(env or {})),
                cwd=str(self.directory),
                start_new_session=True,
            )
        popen.log = log
        self.testcase.addCleanup(stop_process, popen)
        return popen

    def log_tail(self, popen: subprocess.Popen, lines: int = 30) -> str:
        text = Path(popen.log).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def start_master(
        self,
        *options: str,
        listen: str = "tcp:0:interface=127.0.0.1",
        prefix: tuple[str, ...] = (),
        env: dict | None = None,
    ) -> str:
        """Start a master (behind C{prefix}, with C{env}: see L{spawn}); wait until it listens."""
        address_file = self.directory / "master.address"
        address_file.unlink(missing_ok=True)  # a killed master leaves its own
        self.master = self.spawn(
            "master",
            [
                "cw-master",
                "--port",
                listen,
                "--address-file",
                str(address_file),
                *options,
            ],
            prefix,
            env,
        )

        def listening():
            if self.master.poll() is not None:
                raise AssertionError("master exited:\n" + self.log_tail(self.master))
            return address_file.exists() and address_file.read_text().strip()

        self.address = wait_until(listening, what="the master to listen")
        return self.address

    def start_worker(
        self,
        procs: int = 1,
        wait: bool = True,
        *options: str,
        address: str | None = None,
        prefix: tuple[str, ...] = (),
        env: dict | None = None,
    ) -> subprocess.Popen:
        """
        Start a worker (of this master, or at C{address}; behind C{prefix},
        with C{env} added to its environment); wait until it registered.
        """
        from cw.client import wait_for_workers

        self._count += 1
        before = len(self.workers) if wait else 0
        popen = self.spawn(
            f"worker-{self._count}",
            ["cw-worker", "--master", address or self.address, "--procs", str(procs), *options],
            prefix,
            env,
        )
        self.workers.append(popen)
        if wait:
            deadline = time.monotonic() + DEADLINE
            while True:
                if popen.poll() is not None:
                    raise AssertionError(f"worker exited; its log:\n{self.log_tail(popen)}")
                try:
                    wait_for_workers(before + 1, self.address, timeout=1)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"worker did not register; its log:\n{self.log_tail(popen)}"
                        ) from None
        return popen

    def stop_worker(self, popen: subprocess.Popen) -> None:
        """Stop a worker and wait until the master has noticed."""
        from cw.client import master_status

        stop_process(popen)
        self.workers.remove(popen)
        wait_until(
            lambda: len(master_status(self.address)["workers"]) == len(self.workers),
            what="the master to notice the worker left",
        )


def held_client(ex) -> dict | None:
    """
    The master's status entry of the client of C{ex} (a L{ClusterExecutor}
    or L{ClientThread}, the master's only client) once the master holds its
    further jobs (flow control: it used all its room in the queue), else None.
    """
    clients = ex.status()["clients"]
    return clients[0] if clients and clients[0]["held"] else None


@contextlib.contextmanager
def executor(address: str | None = None, **options):
    """
    A L{cw.client.ClusterExecutor} of C{address} (and C{options}) that, if
    the block fails, stops its jobs rather than waiting for them (so a
    failing test does not hang on jobs that will never finish).
    """
    from cw.client import ClusterExecutor

    ex = ClusterExecutor(address, **options)
    try:
        yield ex
    except BaseException:
        abandon(ex)
        raise
    ex.shutdown()


def abandon(ex) -> None:
    """Shut a L{cw.client.ClusterExecutor} down at once: cancel its queued jobs, kill its running ones."""
    outstanding = ex.outstanding()
    ex.shutdown(wait=False, cancel_futures=True)
    ex.kill(*outstanding)
    # The delivery thread closes the connection once nothing is outstanding,
    # then ends: wait for that, so that no connection outlives the test.
    ex._thread.join(DEADLINE)


def stop_pidfiles(directory: str) -> None:
    """
    SIGKILL, with their process groups, the processes that cw's pidfiles
    under C{directory} name (L{cw.system.read_pidfile}: each only while it
    is still the process started).
    """
    for path in Path(directory).rglob("*.pid"):
        pid = read_pidfile(path)
        if pid is not None:
            sigkill(pid, group=True)


def run_script(
    testcase,
    source: str,
    *args: str,
    env: dict | None = None,
    timeout: float = DEADLINE * 2,
    python_options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """
    Run C{source} (dedented) as a Python script in its own session and
    return its outcome; it is killed by its process group in C{testcase}'s
    cleanup if still running.  C{python_options} go to the interpreter
    (C{-W error::DeprecationWarning}).
    """
    path = os.path.abspath(testcase.mktemp()) + ".py"
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    run_dir = os.path.abspath(testcase.mktemp())
    proc = subprocess.Popen(
        [sys.executable, *python_options, path, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(CW_RUN_DIR=run_dir, **(env or {})),
        start_new_session=True,
    )

    def reap():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # What the script started in sessions of their own (cw.mp's master
        # and workers) outlives its group when it was killed before its own
        # cleanup ran: stop those by their pidfiles.
        stop_pidfiles(run_dir)

    testcase.addCleanup(reap)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


#: A script: submit N jobs (job i sleeps DELAY s and returns i * i) under
#: session S to the master at ADDRESS, leave them there (C{detach}) and
#: print how many were left and the jobs' lowest and highest numbers.
SUBMIT_AND_DETACH = """
import sys
from cw.client import ClusterExecutor
from cw.test.jobs import sleep_and_return

address, session, n, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ex = ClusterExecutor(address, session=session)
futures = [ex.submit(sleep_and_return, delay, i * i) for i in range(n)]
left = ex.detach(timeout=20)
print(len(left), min(f.number for f in futures), max(f.number for f in futures))
"""

#: A script: re-attach to session S at ADDRESS and print, as JSON, how many
#: of its jobs did not finish within 30 s and the results of the others.
COLLECT_SESSION = """
import json, sys
from concurrent import futures as cf
from cw.client import ClusterExecutor

address, session = sys.argv[1], sys.argv[2]
with ClusterExecutor(address, session=session) as ex:
    jobs = ex.results_of_session()
    done, pending = cf.wait(jobs.values(), timeout=30)
    if pending:
        ex.kill(*pending)
    results = {n: f.result() for n, f in jobs.items() if f.done()}
    print(json.dumps({"pending": len(pending), "results": results}))
"""


class _AtExit:
    """Cleanups run when the test process exits (for processes shared by many tests)."""

    def __init__(self) -> None:
        self.calls: list = []
        atexit.register(self.run)

    def addCleanup(self, function, *args) -> None:
        self.calls.append((function, args))

    def run(self) -> None:
        for function, args in reversed(self.calls):
            with contextlib.suppress(Exception):
                function(*args)


_shared: dict[str, Processes] = {}


def shared_cluster(name: str, slots: tuple[int, ...] = (2, 1)) -> Processes:
    """
    A master with one worker per entry of C{slots} (its job processes),
    started on first use and shared by every test that asks for C{name};
    stopped by PID when the test process exits.  Blocks: call from a thread.
    """
    procs = _shared.get(name)
    if procs is None or procs.master.poll() is not None or any(w.poll() is not None for w in procs.workers):
        import tempfile

        procs = Processes(_AtExit(), tempfile.mkdtemp(prefix=f"cw-test-{name}-"))
        procs.start_master()
        for n in slots:
            procs.start_worker(procs=n)
        _shared[name] = procs
    return procs


def until(predicate, timeout: float = 10, what: str = "condition"):
    """
    For tests that run in trial's reactor: a Deferred that fires with
    C{predicate()}'s first true value, polled every 10 ms, or fails with
    C{AssertionError} after C{timeout} seconds (well before trial's own
    timeout, so a missing behaviour fails fast).
    """
    from twisted.internet import defer, reactor, task

    @defer.inlineCallbacks
    def poll():
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            yield task.deferLater(reactor, 0.01, lambda: None)

    return poll()


def held(address: str) -> list[int]:
    """How many jobs each worker of the master at C{address} holds (running or prefetched)."""
    from cw.client import master_status

    return [w["held"] for w in master_status(address)["workers"]]


def _status_kib(pid: str | int, field: str) -> int | None:
    """A C{/proc/PID/status} field in KiB (C{VmRSS}, C{VmHWM}), or None if C{pid} is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss_kib(pid: str | int = "self") -> int:
    """The resident set size of C{pid} (default: this process) in KiB."""
    value = _status_kib(pid, "VmRSS")
    if value is None:
        raise AssertionError(f"process {pid} is gone")
    return value


def reset_peak_rss(pid: str | int = "self") -> None:
    """Start C{VmHWM} of C{pid} afresh (Linux: write 5 to C{clear_refs}); ignore failure."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib(pid: str | int) -> float | None:
    """The peak resident set size (C{VmHWM}) of C{pid} in MiB, if it still runs."""
    value = _status_kib(pid, "VmHWM")
    return None if value is None else value / 1024
