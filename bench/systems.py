"""
One system, one round: start it, measure, stop it (even on error), and write
the figures as JSON.  L{bench/run.py} runs this script once per system and
round, each in its own process, so that no system's threads, memory or
leftover processes disturb the next.

    python bench/systems.py SYSTEM --out FILE [--jobs N] [--latency N] ...

SYSTEM is one of cw, ppe, dask, ray, ipp (the common measurements) or
cw-queue, cw-fake, cw-big (cw-only scenarios, see L{cw_queue}, L{cw_fake}
and L{cw_big}).

The job functions are defined here, in C{__main__}, so that cw, Dask, Ray
and ipyparallel all ship them by value, as they would a user's function
from a script or notebook.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1e6

#: Chunked maps (C{map100}, C{map_auto}) map this many times C{--jobs} calls.
CHUNKED_MAP_FACTOR = 10
#: Calls of each big-payload row (argument, result); the row is their median rate.
PAYLOAD_CALLS = 5


def noop(x):
    return x


def size_of(blob):
    return len(blob)


def make_bytes(n):
    return bytes(n)


def array_sum(array):
    return float(array.sum())


#: The medium-payload measure (issue 18): this many jobs, each taking a
#: NumPy array of MEDIUM_BYTES and returning its sum.
MEDIUM_JOBS = 1_000
MEDIUM_BYTES = 1_000_000


# -- measurements shared by all systems -------------------------------------


def rate(n: int, start: float) -> float:
    return n / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


class System:
    """
    Adapter around one system.  C{submit_all(n)} submits C{n} no-op jobs one
    by one and waits for all; C{maps} names the C{map} variants; C{call}
    runs one job and returns its result.
    """

    name = "?"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    #: A concurrent.futures.Executor, for systems that are one (cw, PPE):
    #: the default submit_all and call use it.
    executor = None

    def submit_all(self, n: int) -> None:
        futures = [self.executor.submit(noop, i) for i in range(n)]
        for f in futures:
            f.result()

    def call(self, fn, arg):
        return self.executor.submit(fn, arg).result()

    def submit_each(self, fn, items: list) -> list:
        """C{fn} of each item, submitted one by one; the results once all are done."""
        futures = [self.executor.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def map_each(self, fn, items: list) -> list:
        """C{fn} of each item through the system's C{map} (one call a job)."""
        return list(self.executor.map(fn, items))

    def maps(self) -> dict:
        """Row key -> function(n) mapping noop over range(n)."""
        return {}

    def info(self) -> dict:
        return {}


def insecure() -> list[str]:
    """
    C{["--insecure"]} when C{CW_INSECURE=1} (C{run.py --insecure}): cw without
    authentication and MACs, to measure what they cost.  Clients read the
    variable themselves.
    """
    return ["--insecure"] if os.environ.get("CW_INSECURE") == "1" else []


def state() -> list[str]:
    """
    C{["--state", PATH]} when C{CW_BENCH_STATE} names a file (C{run.py
    --state}): cw's master with its durable queue, to measure what it costs.
    Each start begins with a new file.
    """
    path = os.environ.get("CW_BENCH_STATE")
    if not path:
        return []
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    return ["--state", path]


class CW(System):
    name = "cw"

    def __init__(self, port: int) -> None:
        self.port = port
        self.executor = None

    def start(self) -> None:
        import cw.mp

        cw.mp.start(
            2, port=self.port, procs=1, master_options=insecure() + state(), worker_options=insecure()
        )
        self.connect()

    def connect(self) -> None:
        from cw.client import ClusterExecutor

        self.executor = ClusterExecutor("localhost", port=self.port)

    def stop(self) -> None:
        import cw.mp

        try:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
        finally:
            cw.mp.stop(port=self.port)

    def maps(self) -> dict:
        return {
            "map": lambda n: _drain(self.executor.map(noop, range(n))),
            "map100": lambda n: _drain(self.executor.map(noop, range(n), chunksize=100)),
            "map_auto": lambda n: _drain(self.executor.map(noop, range(n), chunksize="auto")),
        }


class CWRemote(CW):
    """
    cw with its client playing a process on another machine
    (C{CW_MACHINE_IDENTITY}, set in the client only, after the master and
    workers started): payloads take the sockets through the master, as
    between machines, instead of the same-machine shared-memory shortcut.
    """

    name = "cw-remote"

    def connect(self) -> None:
        os.environ["CW_MACHINE_IDENTITY"] = "bench-another-machine"
        super().connect()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            os.environ.pop("CW_MACHINE_IDENTITY", None)


class PPE(System):
    name = "ppe"

    def start(self) -> None:
        import concurrent.futures

        self.executor = concurrent.futures.ProcessPoolExecutor(2)

    def stop(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def maps(self) -> dict:
        return {
            "map": lambda n: _drain(self.executor.map(noop, range(n), chunksize=1)),
            "map100": lambda n: _drain(self.executor.map(noop, range(n), chunksize=100)),
        }


class Dask(System):
    name = "dask"

    def start(self) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client = Client(self.cluster)

    def stop(self) -> None:
        try:
            if getattr(self, "client", None) is not None:
                self.client.close()
        finally:
            if getattr(self, "cluster", None) is not None:
                self.cluster.close()

    def submit_all(self, n: int) -> None:
        # pure=False: every job runs (no key reuse across rounds), no tokenizing.
        futures = [self.client.submit(noop, i, pure=False) for i in range(n)]
        self.client.gather(futures)

    def call(self, fn, arg):
        return self.client.submit(fn, arg, pure=False).result()

    def submit_each(self, fn, items: list) -> list:
        return self.client.gather([self.client.submit(fn, item, pure=False) for item in items])

    def map_each(self, fn, items: list) -> list:
        return self.client.gather(self.client.map(fn, items, pure=False))

    def maps(self) -> dict:
        return {"map": lambda n: self.client.gather(self.client.map(noop, range(n), pure=False))}

    def info(self) -> dict:
        import dask
        import distributed

        return {"versions": {"dask": dask.__version__, "distributed": distributed.__version__}}


class Ray(System):
    name = "ray"

    def start(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self.ray = ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
        self.remote = {f: ray.remote(f) for f in (noop, size_of, make_bytes, array_sum)}

    def stop(self) -> None:
        if getattr(self, "ray", None) is not None:
            self.ray.shutdown()

    def submit_all(self, n: int) -> None:
        f = self.remote[noop]
        self.ray.get([f.remote(i) for i in range(n)])

    def call(self, fn, arg):
        return self.ray.get(self.remote[fn].remote(arg))

    def submit_each(self, fn, items: list) -> list:
        f = self.remote[fn]
        return self.ray.get([f.remote(item) for item in items])

    # Ray has no map: a map is the same remote calls.
    map_each = submit_each

    def maps(self) -> dict:
        return {"map": self.submit_all}

    def info(self) -> dict:
        return {"versions": {"ray": self.ray.__version__}}


class IPP(System):
    name = "ipp"

    def start(self) -> None:
        import ipyparallel

        self.ipp = ipyparallel
        self.cluster = ipyparallel.Cluster(n=2, log_level=40)
        self.rc = None
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(2, timeout=120)
        self.view = self.rc.load_balanced_view()

    def stop(self) -> None:
        try:
            if getattr(self, "rc", None) is not None:
                self.rc.close()
        finally:
            if getattr(self, "cluster", None) is not None:
                self.cluster.stop_cluster_sync()

    def submit_all(self, n: int) -> None:
        results = [self.view.apply_async(noop, i) for i in range(n)]
        for r in results:
            r.get()

    def call(self, fn, arg):
        return self.view.apply_sync(fn, arg)

    def submit_each(self, fn, items: list) -> list:
        results = [self.view.apply_async(fn, item) for item in items]
        return [r.get() for r in results]

    def map_each(self, fn, items: list) -> list:
        return self.view.map_sync(fn, items, chunksize=1)

    def maps(self) -> dict:
        return {
            "map": lambda n: self.view.map_sync(noop, range(n), chunksize=1),
            "map100": lambda n: self.view.map_sync(noop, range(n), chunksize=100),
        }

    def info(self) -> dict:
        return {"versions": {"ipyparallel": self.ipp.__version__}}


def _drain(iterator) -> None:
    for _ in iterator:
        pass


def measure(system: System, args) -> dict:
    """The common figures of one round: throughput, latency, payload rates."""
    out: dict = {}
    system.submit_all(min(200, args.jobs))  # warm up: processes, imports, connections
    start = time.perf_counter()
    system.submit_all(args.jobs)
    out["submit"] = rate(args.jobs, start)
    for key, run in system.maps().items():
        # Chunked maps move calls ten times as fast: ten times as many, to be measurable.
        n = CHUNKED_MAP_FACTOR * args.jobs if key in ("map100", "map_auto") else args.jobs
        start = time.perf_counter()
        run(n)
        out[key] = rate(n, start)
    times = []
    for i in range(args.latency):
        start = time.perf_counter()
        assert system.call(noop, i) == i
        times.append((time.perf_counter() - start) * 1000)
    out["lat_p50"] = percentile(times, 0.5)
    out["lat_p99"] = percentile(times, 0.99)
    if args.payload:
        # One call is one noisy sample on a shared machine: the median of
        # PAYLOAD_CALLS, argument and result calls alternating (so each
        # system's second and later calls find what its first left warm).
        size = args.payload
        blob = os.urandom(size)
        rates: dict[str, list[float]] = {"arg": [], "res": []}
        for _ in range(PAYLOAD_CALLS):
            start = time.perf_counter()
            assert system.call(size_of, blob) == size
            rates["arg"].append(size / MB / (time.perf_counter() - start))
            start = time.perf_counter()
            assert len(system.call(make_bytes, size)) == size
            rates["res"].append(size / MB / (time.perf_counter() - start))
        del blob
        for key, values in rates.items():
            out[key] = statistics.median(values)
    if args.medium:
        out.update(medium(system, args.medium))
    return out


def medium(system: System, n: int) -> dict:
    """
    Medium payloads (issue 18): C{n} jobs each taking a 1 MB NumPy array and
    returning its sum, submitted one by one, then through C{map}: jobs/s of
    each.  Every job gets an array of its own (made before the clock
    starts), as a program's jobs would get different data.
    """
    import numpy

    count = MEDIUM_BYTES // 8
    arrays = [numpy.full(count, float(i)) for i in range(n)]
    expected = [float(i) * count for i in range(n)]
    out = {}
    for key, run in (("medium_submit", system.submit_each), ("medium_map", system.map_each)):
        start = time.perf_counter()
        results = run(array_sum, arrays)
        out[key] = rate(n, start)
        assert list(results) == expected, f"{key}: wrong sums"
    return out


# -- cw-only scenarios ------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) of C{pid} from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def master_pid(port: int) -> int:
    import cw.mp

    return int((cw.mp.run_dir(port) / "master.pid").read_text().split()[0])


def client_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cw_queue(args) -> dict:
    """
    A master alone (no worker) gets C{args.queued} no-op jobs from one
    L{ClientThread} whose callback only counts; the master's peak RSS is
    read once all are queued.  Then two workers join and drain the queue.
    """
    import cloudpickle

    import cw.mp
    from cw.client import ClientThread
    from cw.wire import commands as P

    n = args.queued
    out: dict = {"queued": n, "job_bytes": len(cloudpickle.dumps((noop, (n,), {})))}
    cw.mp.start(0, port=args.port, master_options=insecure())
    client = None
    try:
        pid = master_pid(args.port)
        before = proc_status(pid)
        out["master_rss_idle_mb"] = before["VmRSS"] / 1024
        counted = [0]

        def count(jobid, result):
            counted[0] += 1

        client = ClientThread(count, "localhost", port=args.port)
        client.start()
        start = time.perf_counter()
        for i in range(n):
            client.submit(i, noop, i)
        out["submit_s"] = time.perf_counter() - start
        deadline = time.monotonic() + 300
        while client.session.call(P.GetStatus)["status"]["queued"] < n:
            if time.monotonic() > deadline:
                raise TimeoutError("the master did not queue every job within 300 s")
            time.sleep(0.2)
        out["queue_s"] = time.perf_counter() - start
        queued = proc_status(pid)
        out["master_hwm_mb"] = queued["VmHWM"] / 1024
        out["master_rss_mb"] = queued["VmRSS"] / 1024
        out["master_bytes_per_job"] = (queued["VmHWM"] - before["VmRSS"]) * 1024 / n
        out["client_peak_mb_queued"] = client_peak_rss_mb()
        start = time.perf_counter()
        cw.mp.start(2, port=args.port, master=False, procs=1, worker_options=insecure())
        try:
            client.wait(timeout=args.drain_limit)
            out["drain_s"] = time.perf_counter() - start
            out["drained"] = n
        except TimeoutError:
            out["drain_s"] = time.perf_counter() - start
            out["drained"] = counted[0]
            out["drain_incomplete"] = True
        out["drain_rate"] = out["drained"] / out["drain_s"]
        out["master_hwm_after_mb"] = proc_status(pid)["VmHWM"] / 1024
        out["client_peak_mb"] = client_peak_rss_mb()
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            cw.mp.stop(port=args.port)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process C{pid} so far (from C{/proc}; its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class FakeCluster:
    """
    A master on C{port} with C{n} fake worker connections
    (L{bench/fake_workers.py}, one slot each) and an executor on it; each
    L{measure} adds its jobs/s and what it cost: CPU seconds of the master,
    of the fake workers and of this client, and the boxes of jobs
    (L{P.RunJobs}) the jobs took.  Used by L{cw_fake} and
    L{bench/conns_ratio.py}, which run two side by side.
    """

    def __init__(self, port: int, n: int, tree: str | None = None) -> None:
        self.port, self.n = port, n
        #: Another cw source tree whose master to run (None: this one's, through cw.mp).
        self.tree = tree
        self.master = None
        self.rates: list[float] = []
        self.cpu: list[float] = []
        self.fake_cpu: list[float] = []
        self.client_cpu: list[float] = []
        self.boxes: list[int] = []
        self.fake = None
        self.executor = None

    def start(self) -> None:
        import cw.mp
        from cw.client import ClusterExecutor, wait_for_workers

        options = insecure() + os.environ.get("CW_BENCH_MASTER_OPTIONS", "").split()
        if self.tree is None:
            cw.mp.start(0, port=self.port, master_options=options)
            self.pid = master_pid(self.port)
        else:
            self.start_master(options)
        start = time.perf_counter()
        self.fake = subprocess.Popen(
            [sys.executable, str(HERE / "fake_workers.py"), "--master", f"localhost:{self.port}", *insecure()]
            + ["-n", str(self.n), "--slots", "1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.fake.stdout.readline()
        if not line.startswith("registered"):
            raise RuntimeError(f"fake workers did not register (exit code {self.fake.wait()})")
        wait_for_workers(self.n, "localhost", port=self.port, timeout=600)
        self.register_s = time.perf_counter() - start
        self.executor = ClusterExecutor("localhost", port=self.port)
        self.run(200)

    def start_master(self, options: list[str]) -> None:
        """Run the master of L{tree} on L{port}, and wait until it listens."""
        log = open(f"/tmp/conns-ratio-master-{self.port}.log", "ab")
        self.master = subprocess.Popen(
            [sys.executable, "-m", "cw.master", "--port", f"tcp:{self.port}:interface=127.0.0.1", *options],
            env={**os.environ, "PYTHONPATH": self.tree},
            cwd=self.tree,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.master.pid
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.master.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the master of {self.tree} did not listen on {self.port}") from None
                time.sleep(0.2)

    def run(self, n: int) -> None:
        futures = [self.executor.submit(noop, i) for i in range(n)]
        for f in futures:
            f.result()

    def boxes_so_far(self) -> int:
        from fake_workers import read_counts

        return read_counts(self.fake)[1]

    def measure(self, n: int, warmup: int = 0) -> None:
        """C{warmup} jobs untimed, then C{n} timed."""
        if warmup:
            self.run(warmup)
        boxes = self.boxes_so_far()
        cpu, fake, client = cpu_seconds(self.pid), cpu_seconds(self.fake.pid), time.process_time()
        start = time.perf_counter()
        self.run(n)
        self.rates.append(n / (time.perf_counter() - start))
        self.cpu.append(cpu_seconds(self.pid) - cpu)
        self.fake_cpu.append(cpu_seconds(self.fake.pid) - fake)
        self.client_cpu.append(time.process_time() - client)
        self.boxes.append(self.boxes_so_far() - boxes)

    def latency(self, n: int) -> list[float]:
        """Round trips of C{n} lone no-op jobs one after another, in milliseconds."""
        times = []
        for i in range(n):
            start = time.perf_counter()
            self.executor.submit(noop, i).result()
            times.append((time.perf_counter() - start) * 1000)
        return times

    def stop(self) -> None:
        import cw.mp

        try:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
        finally:
            try:
                if self.fake is not None and self.fake.poll() is None:
                    self.fake.terminate()
                    try:
                        self.fake.wait(60)
                    except subprocess.TimeoutExpired:
                        self.fake.kill()
                        self.fake.wait()
            finally:
                if self.master is None:
                    cw.mp.stop(port=self.port)
                elif self.master.poll() is None:
                    self.master.terminate()
                    try:
                        self.master.wait(60)
                    except subprocess.TimeoutExpired:
                        self.master.kill()
                        self.master.wait()


def cw_fake(args) -> dict:
    """
    Two masters side by side, one with 2 fake worker connections and one
    with C{args.connections} (L{FakeCluster}), measured in C{args.pairs}
    alternating pairs (the order alternating too, so that both see the
    same load from the rest of the machine): C{args.jobs} no-op jobs
    submitted one by one from one L{ClusterExecutor}, after 200 untimed.
    Per side its jobs/s and master CPU seconds per run, and jobs per box;
    then C{args.latency} lone round trips on each.
    """
    few, many = FakeCluster(args.port, 2), FakeCluster(args.port + 1, args.connections)
    sides = (few, many)
    try:
        for side in sides:
            side.start()
        for i in range(args.pairs):
            for side in sides if i % 2 == 0 else sides[::-1]:
                side.measure(args.jobs, warmup=200)
        out = {"connections": args.connections, "jobs": args.jobs, "pairs": args.pairs}
        for key, side in (("few", few), ("many", many)):
            times = side.latency(args.latency)
            out[key] = {
                "connections": side.n,
                "rates": side.rates,
                "cpu_s": side.cpu,
                "fake_cpu_s": side.fake_cpu,
                "boxes": side.boxes,
                "register_s": side.register_s,
                "lat_p50": percentile(times, 0.5) if times else None,
                "lat_p99": percentile(times, 0.99) if times else None,
            }
        out["ratios"] = [m / f for f, m in zip(few.rates, many.rates, strict=True)]
        return out
    finally:
        try:
            few.stop()
        finally:
            many.stop()


def cluster_pids(port: int) -> dict[str, list[int]]:
    """The cw.mp cluster on C{port}: its master's and its workers' PIDs (from their pidfiles)."""
    import cw.mp
    from cw.system import read_pidfile

    workers = [pid for pid in map(read_pidfile, sorted(cw.mp.run_dir(port).glob("worker-*.pid"))) if pid]
    return {"master": [master_pid(port)], "worker": workers}


def reset_peak(pid: int) -> bool:
    """Reset C{pid}'s VmHWM to its current RSS (Linux's clear_refs 5); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peaks_during(pids: dict[str, list[int]], size: int, run) -> dict:
    """
    Run C{run()} and return, for each role of C{pids}, the highest peak RSS
    (VmHWM) one of its processes reached meanwhile, in MiB, and how many
    copies of C{size} bytes that peak held above the process's RSS before.
    Where VmHWM cannot be reset, it is the peak since the process started.
    """
    before = {pid: proc_status(pid) for role in pids.values() for pid in role}
    reset = all([reset_peak(pid) for pid in before])
    run()
    out: dict = {"peak_reset": reset}
    for role, role_pids in pids.items():
        figures = []
        for pid in role_pids:
            try:
                hwm = proc_status(pid)["VmHWM"]
            except (OSError, KeyError):
                continue  # gone
            figures.append((hwm / 1024, (hwm - before[pid]["VmRSS"]) * 1024 / size))
        if figures:
            out[role] = {"peak_mb": max(f[0] for f in figures), "copies": max(f[1] for f in figures)}
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) C{pid} has spent, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The PIDs of C{pid}'s children (a worker's job processes), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def cpu_during(pids: dict[str, list[int]], size: int, run) -> dict:
    """
    Run C{run()} and return the CPU seconds (user and system) per GB
    (1e9 bytes) of C{size} bytes that the busiest process of each role
    spent meanwhile: the master, a worker, a job process (C{job}, the
    workers' children) and this process (C{client}); and C{total}, those
    of every process of the cluster and this one.  What each process would
    need of a machine of its own to move C{size} bytes, and so the rate
    the busiest allows if each had one (L{own_machines_rate}).
    """
    roles = {role: list(role_pids) for role, role_pids in pids.items()}
    roles["job"] = [child for pid in pids.get("worker", []) for child in child_pids(pid)]
    before = {}
    for role_pids in roles.values():
        for pid in role_pids:
            try:
                before[pid] = process_cpu(pid)
            except OSError:
                pass
    client = time.process_time()
    run()
    client = time.process_time() - client
    out = {}
    total = client
    for role, role_pids in roles.items():
        spent = []
        for pid in role_pids:
            try:
                spent.append(process_cpu(pid) - before[pid])
            except (OSError, KeyError):
                continue  # gone
        out[role] = max(spent, default=0.0) * 1e9 / size
        total += sum(spent)
    out["client"] = client * 1e9 / size
    out["total"] = total * 1e9 / size
    return out


def own_machines_rate(cpu: dict) -> float:
    """
    MB/s (1e6 bytes) if every process of L{cpu_during}'s figures C{cpu}
    had a machine of its own: the busiest process's CPU seconds per GB
    bound it (a perfect pipeline, the network no bound).
    """
    return 1000 / max(seconds for role, seconds in cpu.items() if role != "total")


def cw_big(args, remote: bool = False) -> dict:
    """
    One job with an C{args.big}-byte argument, then one with such a result,
    on cw: the rate of each, and the peak RSS (VmHWM) of the master and the
    workers during each.  C{remote}: the client plays a process on another
    machine (L{CWRemote}), so the payloads cross the sockets.
    """
    system = CWRemote(args.port) if remote else CW(args.port)
    try:
        system.start()
        assert system.call(noop, 1) == 1
        pids = cluster_pids(args.port)
        blob = [os.urandom(args.big)]
        out: dict = {"big": args.big}
        peaks: dict = {}

        def argument():
            start = time.perf_counter()
            assert system.call(size_of, blob[0]) == args.big
            out["big_arg"] = args.big / MB / (time.perf_counter() - start)

        out["big_arg_cpu"] = cpu_during(
            pids, args.big, lambda: peaks.update(arg=peaks_during(pids, args.big, argument))
        )
        blob.clear()

        def result():
            start = time.perf_counter()
            assert len(system.call(make_bytes, args.big)) == args.big
            out["big_res"] = args.big / MB / (time.perf_counter() - start)

        out["big_res_cpu"] = cpu_during(
            pids, args.big, lambda: peaks.update(res=peaks_during(pids, args.big, result))
        )
        out["big_arg_peaks"], out["big_res_peaks"] = peaks["arg"], peaks["res"]
        out["client_peak_mb"] = client_peak_rss_mb()
        return out
    finally:
        system.stop()


SYSTEMS = {"cw": CW, "cw-remote": CWRemote, "ppe": PPE, "dask": Dask, "ray": Ray, "ipp": IPP}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=[*SYSTEMS, "cw-queue", "cw-fake", "cw-big", "cw-big-remote"])
    parser.add_argument("--out", required=True, help="write the figures here as JSON")
    parser.add_argument("--port", type=int, default=5499)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency", type=int, default=1000)
    parser.add_argument("--payload", type=int, default=50_000_000)
    parser.add_argument("--medium", type=int, default=MEDIUM_JOBS, help="1 MB NumPy jobs (0: skip)")
    parser.add_argument("--queued", type=int, default=1_000_000)
    parser.add_argument("--drain-limit", type=float, default=600)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=3, help="cw-fake: alternating pairs of runs")
    parser.add_argument("--big", type=int, default=1_000_000_000)
    args = parser.parse_args()

    def terminate(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    warnings.filterwarnings("ignore", message="Sending large graph")  # Dask, on the 50 MB argument
    result: dict = {"system": args.system}
    try:
        if args.system == "cw-queue":
            result.update(cw_queue(args))
        elif args.system == "cw-fake":
            result.update(cw_fake(args))
        elif args.system in ("cw-big", "cw-big-remote"):
            result.update(cw_big(args, remote=args.system == "cw-big-remote"))
        else:
            kind = SYSTEMS[args.system]
            system = kind(args.port) if issubclass(kind, CW) else kind()
            try:
                system.start()
                result.update(measure(system, args))
                result.update(system.info())
            finally:
                system.stop()
    except ImportError as e:
        result["error"] = f"not installed: {e.name or e}"
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        Path(args.out).write_text(json.dumps(result))
        raise
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
