"""
Tiny-job throughput: cw against concurrent.futures.ProcessPoolExecutor
(and Dask distributed, if installed), 2 worker processes each, same run.

    python bench/tiny_jobs.py [--jobs 10000] [--rounds 3]

Prints jobs/s for each system (best of the rounds, systems alternating)
and the ratio to cw.  A first step towards the benchmark suite of issue 3;
C{bench/run.py} is the full comparison (Ray and ipyparallel too, latency,
large payloads, a million queued jobs, 200 worker connections).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time


def noop(x):
    return x


def timed(executor, jobs: int) -> float:
    start = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(jobs)]
    for f in futures:
        f.result()
    return jobs / (time.perf_counter() - start)


def latency(executor, rounds: int) -> tuple[float, float]:
    """p50 and p99 round trip of one no-op job at a time, in milliseconds."""
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        executor.submit(noop, i).result()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def make_bytes(n):
    return b"r" * n


def payload_rates(executor, size: int) -> tuple[float, float]:
    """MB/s for one job with a C{size}-byte argument, and one with such a result."""
    blob = b"a" * size
    start = time.perf_counter()
    assert executor.submit(len, blob).result() == size
    arg = size / 1e6 / (time.perf_counter() - start)
    start = time.perf_counter()
    assert len(executor.submit(make_bytes, size).result()) == size
    res = size / 1e6 / (time.perf_counter() - start)
    return arg, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=5499)
    args = parser.parse_args()

    import cw.mp
    from cw.client import ClusterExecutor

    systems = {}
    cw.mp.start(2, port=args.port)
    try:
        systems["cw (2 workers x 1 proc)"] = ClusterExecutor(port=args.port)
        systems["ProcessPoolExecutor(2)"] = concurrent.futures.ProcessPoolExecutor(2)
        try:
            from dask.distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
            systems["dask LocalCluster(2)"] = Client(cluster)
        except ImportError:
            pass
        for ex in systems.values():
            timed(ex, 200)  # warm up
        best = dict.fromkeys(systems, 0.0)
        lat = {}
        for _ in range(args.rounds):
            for name, ex in systems.items():
                best[name] = max(best[name], timed(ex, args.jobs))
        big = {}
        for name, ex in systems.items():
            lat[name] = latency(ex, 500)
            big[name] = payload_rates(ex, 50_000_000)
        base = best["cw (2 workers x 1 proc)"]
        print(f"{args.jobs} no-op jobs submitted one by one (best of {args.rounds});")
        print("round trip of one no-op job at a time (500 jobs)")
        print("and one job with a 50 MB argument, one with a 50 MB result (MB/s)")
        header = f"{'system':32} {'jobs/s':>10} {'vs cw':>8} {'p50 ms':>8} {'p99 ms':>8}"
        print(header + f" {'50MB arg':>9} {'50MB res':>9}")
        for name, rate in best.items():
            p50, p99 = lat[name]
            arg, res = big[name]
            print(f"{name:32} {rate:10.0f} {rate / base:8.2f} {p50:8.2f} {p99:8.2f} {arg:9.0f} {res:9.0f}")
        for ex in systems.values():
            if hasattr(ex, "shutdown"):
                ex.shutdown()
            else:
                ex.close()
    finally:
        cw.mp.stop(port=args.port)


if __name__ == "__main__":
    main()
